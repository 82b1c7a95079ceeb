"""Shared fixtures: an in-process CLI runner and tiny models built on the spot."""

from __future__ import annotations

import errno
import functools
import importlib.util
import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from filelock import FileLock

from so8t_deploy.cli.app import main
from tests.gotemplate import INSTALL_HINT, GoToolchainMissing
from tests.hub_fixtures import hf_env, hub, hub_model, hub_server  # noqa: F401 - the test hub's fixtures
from tests.ollama_server import ServerPool

REPO = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI", "").lower() == "true"

# Same locations the Makefile exports, so a bare `pytest` reuses the converter and the sdist.
os.environ.setdefault("SO8T_CACHE_DIR", str(REPO / ".cache" / "so8t"))
_SDIST = REPO / ".cache" / "sdist" / "llama_cpp_python-0.3.36.tar.gz"
if _SDIST.is_file():
    os.environ.setdefault("SO8T_LLAMA_CPP_SDIST", str(_SDIST))


def require(component: str, available: bool, how: str) -> None:
    """Skip a test whose component is missing, except under CI=true, where that is a failure."""
    if available:
        return
    message = f"{component} is not available ({how})"
    if IN_CI:
        pytest.fail(f"CI=true: {message}")
    pytest.skip(message)


@pytest.fixture(autouse=True)
def _components(request):
    if request.node.get_closest_marker("llamacpp"):
        require("llama-cpp-python", importlib.util.find_spec("llama_cpp") is not None, "run `make test`")


# A test needs Go when it starts an Ollama test server (tests/ollama_server renders templates with Go's own
# text/template). Without Go that start raises GoToolchainMissing, in a fixture of any scope or in the test:
# like require(), report it as a skip, except under CI=true, where it stays a failure.
@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if call.excinfo is not None and call.excinfo.errisinstance(GoToolchainMissing) and not IN_CI:
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0,
                           f"Skipped: the Go toolchain is not available ({INSTALL_HINT})")
    return report


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def run_cli(capsys):
    """Run `so8t-deploy ARGS...` in-process through the real entry point and error boundary."""

    def run(*args: object) -> CliResult:
        capsys.readouterr()  # only what this command prints (not a fixture's progress bars before it)
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


def error_lines(stderr: str, manifest: object = None) -> list[str]:
    """What stderr says besides the progress lines ('> bake full ...', which a piped command prints there too).
    With `manifest`: warnings left out as well, and each line must be the error boundary's, naming the
    manifest; returned without that prefix."""
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("> ")]
    if manifest is None:
        return lines
    lines = [line for line in lines if not line.startswith("warning: ")]
    for line in lines:
        assert line.startswith(f"{manifest}: "), line
    return [line.removeprefix(f"{manifest}: ") for line in lines]


@pytest.fixture
def instant_retries(monkeypatch) -> list[float]:
    """Retries without their pauses, for tests of what a retry does rather than how long it waits: every
    OllamaHost and RegistryClient made without a clock gets one whose sleep returns at once and moves its
    monotonic on by as much (deadlines still pass as they would), and the hub's retry pause returns at once.
    Returns the list of the pauses asked for, in seconds."""
    from so8t_deploy.external import hub as hub_module
    from so8t_deploy.external import ollama_host

    pauses: list[float] = []
    lock = threading.Lock()

    def sleep(seconds: float) -> None:
        with lock:
            pauses.append(seconds)

    def monotonic() -> float:
        with lock:
            return time.monotonic() + sum(pauses)

    monkeypatch.setattr(ollama_host, "DEFAULT_CLOCK", ollama_host.Clock(monotonic=monotonic, sleep=sleep))
    monkeypatch.setattr(hub_module, "retry_sleep", sleep)
    return pauses


@pytest.fixture
def refuse_direct_io(monkeypatch) -> Callable[[], None]:
    """Call it, and from then on every open with O_DIRECT fails with EINVAL, as on tmpfs and some FUSE and
    network file systems."""
    plain_open = os.open

    def refusing(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return plain_open(path, flags, *args)

    return lambda: monkeypatch.setattr(os, "open", refusing)


@pytest.fixture
def pool(tmp_path):
    """Ollama test servers for one test, each a process with its own store: pool.start(n) -> n URLs."""
    servers = ServerPool(tmp_path / "hosts")
    yield servers
    servers.stop_all()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Build (once per session) a tiny random model: tiny_model("phi3", num_kv_heads=2, ...)."""
    from so8t_deploy.tiny_models import write_tiny_model

    cache: dict[tuple, Path] = {}

    def build(arch: str, **kwargs) -> Path:
        kwargs.setdefault("hidden_size", 64)
        key = (arch, *sorted(kwargs.items()))
        if key not in cache:
            name = "-".join([arch, *(f"{k}{v}" for k, v in sorted(kwargs.items()))])
            cache[key] = write_tiny_model(tmp_path_factory.mktemp("models") / name, arch, **kwargs)
        return cache[key]

    return build


@pytest.fixture(scope="session")
def so8t_adapter(tmp_path_factory):
    """Build a random SO8T adapter: so8t_adapter(hidden, layers, **options)."""
    from so8t_deploy.tiny_models import write_random_so8t_adapter

    def build(hidden_size: int = 64, num_layers: int = 2, **kwargs) -> Path:
        return write_random_so8t_adapter(tmp_path_factory.mktemp("so8t"), hidden_size, num_layers, **kwargs)

    return build


def once_per_run(tmp_path_factory: pytest.TempPathFactory, name: str, make: Callable[[Path], object]) -> Path:
    """The directory `name`, filled by `make(directory)` once per test run: under pytest-xdist the first worker to
    ask makes it while the others wait on its lock, then every worker reads the same one (in the run's base
    temporary directory, which holds each worker's own). What is in it is read-only to the tests."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    directory, done = root / f"once-{name}", root / f"once-{name}.done"
    with FileLock(root / f"once-{name}.lock"):
        if not done.exists():
            shutil.rmtree(directory, ignore_errors=True)  # what a worker that failed here left
            directory.mkdir()
            make(directory)
            done.touch()
    return directory


def shared_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo directory of `so8t-deploy demo init` (tiny Phi-3, SO8T adapter, manifest.yaml), made once per
    run. Shared by every test: copy it before writing into it."""
    from so8t_deploy.demo import init_demo

    return once_per_run(tmp_path_factory, "demo", lambda root: init_demo(root / "demo")) / "demo"


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> Path:
    """shared_demo: the run's demo directory, read-only."""
    return shared_demo(tmp_path_factory)


@pytest.fixture(scope="session")
def built_demo(tmp_path_factory):
    """The shared demo directory's model and SO8T adapter, both variants' f16 and q8_0 GGUFs built once per run into
    one workspace: (demo directory, cache directory). The demo directory is shared, read-only; the workspace,
    which applies write to, is this session's own copy (under xdist: each worker's)."""
    from so8t_deploy.deploy.commands import build_manifest
    from so8t_deploy.manifest.loader import load_manifest
    from so8t_deploy.store.workspace import Workspace

    demo = shared_demo(tmp_path_factory)
    built = once_per_run(tmp_path_factory, "built-demo", lambda root: build_manifest(
        load_manifest(demo / "manifest.yaml"), Workspace(root / "cache")))
    cache = tmp_path_factory.mktemp("built-demo") / "cache"
    shutil.copytree(built / "cache", cache, symlinks=True)  # copy2: sizes and mtimes as published
    return demo, cache


@pytest.fixture(scope="session", autouse=True)
def _vocabulary_tokenizers_once_per_run(tmp_path_factory):
    """A chat family's tokenizer (tiny_models.write_family_model) starts as the one transformers reads from
    llama.cpp's vocabulary GGUF: 15 to 20 s for Llama 3's or Qwen's, and tiny_models keeps it only for its own
    process. Here each vocabulary is read once per run, by the first xdist worker that needs it; the others
    take what it read from the run's shared directory."""
    from so8t_deploy import tiny_models

    read = tiny_models._gguf_tokenizer

    @functools.cache
    def shared(vocab_gguf: Path) -> tuple[str, str | None]:
        def make(directory: Path) -> None:
            tokenizer_json, unk = read(vocab_gguf)
            (directory / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
            (directory / "unk.json").write_text(json.dumps(unk), encoding="utf-8")

        directory = once_per_run(tmp_path_factory, f"vocabulary-{vocab_gguf.name}", make)
        return ((directory / "tokenizer.json").read_text(encoding="utf-8"),
                json.loads((directory / "unk.json").read_text(encoding="utf-8")))

    tiny_models._gguf_tokenizer = shared
    yield
    tiny_models._gguf_tokenizer = read


@pytest.fixture(scope="session")
def family_model(tmp_path_factory):
    """Build (once per run) a tiny model of a real chat family, with the family's own tokenizer and chat
    template from the pinned llama.cpp sdist (or, where the sdist lacks it, from tests/family_templates.py):
    family_model("llama3.1") -> model dir (see tiny_models.FAMILIES). The directory is named after the family
    (llama.cpp recognizes Phi-3 by the GGUF's name, taken from it)."""
    from so8t_deploy.tiny_models import write_family_model

    from .family_templates import family_chat_template

    cache: dict[str, Path] = {}

    def build(family: str) -> Path:
        if family not in cache:
            root = once_per_run(tmp_path_factory, f"family-{family}", lambda root: write_family_model(
                root / family, family, chat_template=family_chat_template(family)))
            cache[family] = root / family
        return cache[family]

    return build


@pytest.fixture(scope="session")
def family_tokenizer(family_model):
    """The family model's tokenizer, loaded once per session (a Llama 3 tokenizer.json takes seconds)."""
    import transformers

    cache: dict[str, object] = {}

    def load(family: str):
        if family not in cache:
            cache[family] = transformers.AutoTokenizer.from_pretrained(family_model(family))
        return cache[family]

    return load


# --- a real OCI registry (tests/registry.py: Debian's docker-registry on loopback) -----------------------

@pytest.fixture
def make_registry(tmp_path):
    """make_registry(location_header=True, auth=None, realm="basic-realm") -> a started Registry, stopped after
    the test. Without docker-registry: a skip (a failure under CI=true)."""
    from tests.registry import INSTALL_HINT, Registry, registry_available

    require("docker-registry", registry_available(), INSTALL_HINT)
    started: list[Registry] = []

    def make(**options) -> Registry:
        registry = Registry(tmp_path / f"registry-{len(started)}", **options)
        started.append(registry)
        registry.start()
        return registry

    yield make
    for registry in started:
        registry.stop()


@pytest.fixture
def registry(make_registry):
    """A registry that Ollama can pull from: plain HTTP, no auth, `Location: ?` on blob GETs."""
    return make_registry()


@pytest.fixture
def auth_registry(make_registry):
    """A registry with htpasswd auth for one user, tests.registry.TEST_AUTH (registry.auth)."""
    from tests.registry import TEST_AUTH

    return make_registry(auth=TEST_AUTH)
