"""Hostile manifests (issue 14, acceptance 1): each is refused quickly, in one line, with its exit code, and
no secret in it. Every case runs through the real entry point, in a thread with a deadline, so a manifest that
hangs the loader (a FIFO) fails the test instead of hanging it.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import error_lines

TIME_LIMIT_S = 10.0
TOKEN = "tok-S3CRET-a1b2c3d4e5"  # a header value: it must never be printed
PASSWORD = "pw-S3CRET-f6g7h8"  # a URL's password: the same
SECRETS = (TOKEN, PASSWORD)
HEADER = f'"Bearer {TOKEN}"'
HOST = "http://127.0.0.1:11434"

BASE = """\
apiVersion: so8t-deploy/v1
name: hostile
source:
  model: ./model
  adapters:
    - {kind: so8t, path: adapters/so8t}
bake:
  variants:
    full: {}
quantize: [q8_0]
modelfile:
  parameters: {temperature: 0.7, num_ctx: 4096}
targets:
  - name: gpu-a
    host: http://127.0.0.1:11434
    headers: {Authorization: "Bearer tok-S3CRET-a1b2c3d4e5"}
rollout: {canary: 1, parallelism: 4}
smoke:
  - {prompt: "Reply with hello.", expect: "hello", timeout_s: 120}
"""


def edited(old: str, new: str) -> str:
    assert old in BASE, old
    return BASE.replace(old, new, 1)


def billion_laughs() -> str:
    """Ten levels of ten aliases each: 10^10 strings once expanded."""
    lines = ['l0: &l0 "lol"']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 11)]
    return BASE + "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Case:
    """A manifest (text, or a function making the path) and what the CLI must answer."""

    make: str | Callable[[Path], Path]
    code: int
    message: str  # a regular expression searched in the one error line
    env: tuple[tuple[str, str], ...] = ()


def _fifo(tmp_path: Path) -> Path:
    path = tmp_path / "fifo.yaml"
    os.mkfifo(path)
    return path


def _directory(tmp_path: Path) -> Path:
    path = tmp_path / "dir.yaml"
    path.mkdir()
    return path


def _over_a_mebibyte(tmp_path: Path) -> Path:
    path = tmp_path / "big.yaml"
    path.write_text(BASE + "# padding\n" * 110_000, encoding="utf-8")  # 1.1 MB of valid YAML
    return path


def _not_utf8(tmp_path: Path) -> Path:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(edited('name: hostile', 'name: "h\u00e9"').encode("latin-1"))
    return path


CASES: dict[str, Case] = {
    # -- secrets: a header value that HTTP would refuse, refused at validate without quoting it
    "token-trailing-newline": Case(edited(HEADER, '"Bearer ${TOKEN}"'), 2,
                                   r"targets\[0\]\.headers\.Authorization: ends with a line break",
                                   env=(("TOKEN", TOKEN + "\n"),)),
    "token-trailing-newline-in-yaml": Case(edited(HEADER, f'"Bearer {TOKEN}\\n"'), 2,
                                           r"headers\.Authorization: ends with a line break"),
    "token-trailing-space": Case(edited(HEADER, f'"Bearer {TOKEN} "'), 2,
                                 r"headers\.Authorization: starts or ends with a space"),
    "token-leading-space": Case(edited(HEADER, f'" Bearer {TOKEN}"'), 2,
                                r"headers\.Authorization: starts or ends with a space"),
    "header-non-ascii": Case(edited(HEADER, f'"Bearer {TOKEN}\u00e9"'), 2,
                             r"headers\.Authorization: contains non-ASCII characters"),
    "header-crlf-injection": Case(edited(HEADER, f'"Bearer {TOKEN}\\r\\nX-Evil: 1"'), 2,
                                  r"headers\.Authorization: contains a line break"),
    "header-nul": Case(edited(HEADER, f'"Bearer {TOKEN}\\0"'), 2,
                       r"headers\.Authorization: contains a control character \(U\+0000\)"),
    "header-not-a-string": Case(edited(HEADER, f'["{TOKEN}"]'), 2,
                                r"headers\.Authorization: Input should be a valid string"),
    "header-bad-name": Case(edited(f"Authorization: {HEADER}", f'"Bad Name": {HEADER}'), 2,
                            r"targets\[0\]\.headers: invalid HTTP header name 'Bad Name'"),
    # -- secrets: credentials in a URL are refused (not stripped), the password masked
    "url-user-password": Case(edited(HOST, f"http://admin:{PASSWORD}@127.0.0.1:11434"), 2,
                              re.escape("targets[0].host: a URL with credentials ('http://admin:***@127.0.0.1:11434')"
                                        ": put them in headers: instead")),
    "url-user-only": Case(edited(HOST, f"http://{TOKEN}@127.0.0.1:11434"), 2,
                          re.escape("a URL with credentials ('http://***@127.0.0.1:11434')")),
    "url-password-with-slash": Case(edited(HOST, f"http://admin:{PASSWORD}/x@127.0.0.1:11434"), 2,
                                    re.escape("('http://admin:***@127.0.0.1:11434')")),
    "url-bad-port-and-password": Case(edited(HOST, f"http://admin:{PASSWORD}@127.0.0.1:99999"), 2,
                                      re.escape("('http://admin:***@127.0.0.1:99999')")),
    "url-token-in-query": Case(edited(HOST, f"http://127.0.0.1:11434/?token={PASSWORD}"), 2,
                               re.escape("invalid URL 'http://127.0.0.1:11434/?***': expected scheme://host[:port]")),
    # -- the YAML itself
    "billion-laughs": Case(billion_laughs(), 2, r":\d+:\d+: YAML anchors \(&l0\) are not allowed"),
    "alias": Case(BASE + "x: &a [1]\ny: *a\n", 2, r"YAML anchors \(&a\) are not allowed"),
    "merge-key": Case(BASE + "y: {<<: *a}\n", 2, r"YAML aliases \(\*a\) are not allowed"),
    "nested-brackets-100k": Case(BASE + "deep: " + "[" * 100_000 + "]" * 100_000 + "\n", 2,
                                 r"nest|depth"),
    "nested-blocks": Case(BASE + "deep:\n" + "".join("  " * i + "-\n" for i in range(200)), 2,
                          r"maximum nesting depth of a manifest \(64 levels\)"),
    "integer-5000-digits": Case(edited("parallelism: 4", "parallelism: " + "9" * 5000), 2,
                                r":\d+:\d+: an integer written with more than 100 characters"),
    "quoted-integer-5000-digits": Case(edited("parallelism: 4", 'parallelism: "' + "9" * 5000 + '"'), 2,
                                       r"rollout\.parallelism: .*integer"),
    "integer-over-64-bits": Case(edited("num_ctx: 4096", "num_ctx: 99999999999999999999999"), 2,
                                 r"integer out of range"),
    "python-tag": Case(BASE + "x: !!python/object/apply:os.system [echo]\n", 2, r"invalid YAML: .*constructor"),
    # -- the file
    "fifo": Case(_fifo, 2, r"cannot read manifest: not a regular file \(a FIFO\)"),
    "dev-zero": Case(lambda _: Path("/dev/zero"), 2, r"cannot read manifest: not a regular file \(a character"),
    "over-1-MiB": Case(_over_a_mebibyte, 2, r"cannot read manifest: larger than 1 MiB"),
    "directory": Case(_directory, 2, r"cannot read manifest: not a regular file \(a directory\)"),
    "missing": Case(lambda tmp: tmp / "absent.yaml", 2, r"cannot read manifest: No such file"),
    "not-utf8": Case(_not_utf8, 2, r"cannot read manifest: not UTF-8 text"),
    # -- numbers: finite and in range, named by field
    "smoke-timeout-inf": Case(edited("timeout_s: 120", "timeout_s: .inf"), 2,
                              r"smoke\[0\]\.timeout_s: Input should be a finite number"),
    "smoke-timeout-1e400": Case(edited("timeout_s: 120", "timeout_s: 1e400"), 2,
                                r"smoke\[0\]\.timeout_s: Input should be a finite number"),
    "smoke-timeout-nan": Case(edited("timeout_s: 120", "timeout_s: .nan"), 2,
                              r"smoke\[0\]\.timeout_s: Input should be a finite number"),
    "smoke-timeout-a-year": Case(edited("timeout_s: 120", "timeout_s: 31536000"), 2,
                                 r"smoke\[0\]\.timeout_s: Input should be less than or equal"),
    "host-timeout-inf": Case(edited(HOST, HOST + "\n    timeout_s: .inf"), 2,
                             r"targets\[0\]\.timeout_s: Input should be a finite number"),
    "parallelism-zero": Case(edited("parallelism: 4", "parallelism: 0"), 2,
                             r"rollout\.parallelism: Input should be greater than or equal to 1"),
    "parallelism-negative": Case(edited("parallelism: 4", "parallelism: -3"), 2,
                                 r"rollout\.parallelism: Input should be greater than or equal to 1"),
    "parallelism-nan": Case(edited("parallelism: 4", "parallelism: .nan"), 2,
                            r"rollout\.parallelism: Input should be a finite number"),
    "canary-negative": Case(edited("canary: 1", "canary: -1"), 2, r"rollout\.canary: .*greater than or equal"),
    "scale-nan": Case(edited("full: {}", "full: {ffn: .nan}"), 2, r"bake\.variants\.full\.ffn: .*finite"),
    "temperature-nan": Case(edited("temperature: 0.7", "temperature: .nan"), 2,
                            r"modelfile\.parameters: option 'temperature' must be of type float"),
    "temperature-huge": Case(edited("temperature: 0.7", "temperature: 1.0e+300"), 2,
                             r"modelfile\.parameters: option 'temperature' must be from"),
    "smoke-temperature-inf": Case(edited("timeout_s: 120", "timeout_s: 120, temperature: .inf"), 2,
                                  r"smoke\[0\]\.temperature: Input should be a finite number"),
    "keep-alive-nan": Case(edited("timeout_s: 120", "timeout_s: 120, keep_alive: .nan"), 2,
                           r"smoke\[0\]\.keep_alive: must be a number of seconds"),
    "gate-nan": Case(BASE + "quality: {max_mean_kl: .nan}\n", 2, r"quality\.max_mean_kl: .*finite"),
    "top1-inf": Case(BASE + "quality: {min_top1: .inf}\n", 2, r"quality\.min_top1: .*finite"),
    "min-tps-inf": Case(edited("timeout_s: 120", "timeout_s: 120, min_tokens_per_second: .inf"), 2,
                        r"smoke\[0\]\.min_tokens_per_second: .*finite"),
    # -- a secret in a target that is wrong for another reason: the message names the key, not the values
    "secret-in-bad-target": Case(edited("    host: http", "    hots: x\n    host: http"), 2,
                                 r"targets\[0\]\.hots: unknown key"),
}


@dataclass
class Answer:
    code: int
    out: str
    err: str
    seconds: float


def run_bounded(run_cli, args: list[object]) -> Answer:
    """The CLI in a thread: the test fails at the deadline instead of hanging with a hanging CLI."""
    box: dict = {}

    def target() -> None:
        try:
            box["result"] = run_cli(*args)
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            box["error"] = e

    started = time.monotonic()
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(TIME_LIMIT_S)
    seconds = time.monotonic() - started
    assert not thread.is_alive(), f"{args}: still running after {TIME_LIMIT_S} s"
    assert "error" not in box, f"{args}: escaped the error boundary: {box.get('error')!r}"
    result = box["result"]
    return Answer(result.code, result.out, result.err, seconds)


def assert_no_secret(answer: Answer) -> None:
    text = answer.out + answer.err
    for secret in SECRETS:
        assert secret not in text, f"a secret was printed:\n{text}"


def write_case(case: Case, tmp_path: Path, monkeypatch) -> Path:
    for name, value in case.env:
        monkeypatch.setenv(name, value)
    if callable(case.make):
        return case.make(tmp_path)
    path = tmp_path / "manifest.yaml"
    path.write_text(case.make, encoding="utf-8")
    return path


@pytest.mark.parametrize("name", sorted(CASES), ids=str)
def test_a_hostile_manifest_is_one_line_quickly_and_leaks_nothing(run_cli, tmp_path, monkeypatch, name):
    case = CASES[name]
    path = write_case(case, tmp_path, monkeypatch)
    answer = run_bounded(run_cli, ["validate", path])
    assert answer.seconds < TIME_LIMIT_S
    assert answer.code == case.code, answer.err
    assert answer.out == ""
    assert "Traceback" not in answer.err
    lines = error_lines(answer.err)
    assert len(lines) == 1, answer.err
    assert lines[0].startswith(f"{path}:"), lines[0]  # then the field, or the line and column
    assert re.search(case.message, lines[0]), lines[0]
    assert_no_secret(answer)


@pytest.mark.parametrize("name", ["secret-in-bad-target", "token-trailing-newline", "url-user-password",
                                  "header-non-ascii", "url-password-with-slash"])
def test_verbose_shows_the_traceback_but_no_secret(run_cli, tmp_path, monkeypatch, name):
    """-v prints the error's traceback: neither it nor a chained exception (pydantic's input_value) holds a secret."""
    case = CASES[name]
    path = write_case(case, tmp_path, monkeypatch)
    answer = run_bounded(run_cli, ["-v", "validate", path])
    assert answer.code == case.code
    assert "Traceback" in answer.err  # -v did show it: the check below looked at a traceback
    assert "input_value" not in answer.err and "During handling" not in answer.err
    assert re.search(case.message, answer.err.strip().splitlines()[-1])
    assert_no_secret(answer)


def test_the_valid_base_of_the_corpus_validates(run_cli, tmp_path):
    """The corpus's cases fail for what each changed, not because the base is broken."""
    (tmp_path / "model").mkdir()
    (tmp_path / "adapters" / "so8t").mkdir(parents=True)
    path = tmp_path / "manifest.yaml"
    path.write_text(BASE, encoding="utf-8")
    from so8t_deploy.manifest.loader import load_manifest

    manifest = load_manifest(path)
    assert manifest.targets[0].headers["Authorization"].get_secret_value() == f"Bearer {TOKEN}"
    assert TOKEN not in repr(manifest)


def test_interpolation_never_expands_shared_nodes():
    """A tree with shared nodes (what aliases make; PyYAML's own SafeLoader builds one from billion_laughs())
    is interpolated in the time of its text, not of its 10^10-string expansion."""
    import yaml

    from so8t_deploy.manifest.loader import interpolate_env

    tree = yaml.safe_load(billion_laughs().replace('"lol"', '"${LAUGH}"'))
    started = time.monotonic()
    out = interpolate_env(tree, {"LAUGH": "ha"})
    assert time.monotonic() - started < 1.0
    assert out["l1"][0] == "ha" and out["l10"][0] is out["l10"][1]  # shared again, not copied ten times
    assert tree["l1"][0] == "${LAUGH}"  # the input is left as it was


def test_the_redactor_catches_every_form_of_a_secret():
    from so8t_deploy.manifest.secrets import Redactor

    redact = Redactor([f"Bearer {TOKEN}\n", "1"])
    assert redact(f"Illegal header value b'Bearer {TOKEN}\\n'") == "Illegal header value b'***'"
    assert redact(f"token {TOKEN} rejected") == "token *** rejected"  # the token without its scheme word
    assert redact("HTTP 401 for Bearer x") == "HTTP 401 for Bearer x"  # short values and words are not secrets


def test_masking_a_url_never_shows_a_password_or_a_query():
    from so8t_deploy.manifest.deploy_schema import mask_credentials

    assert mask_credentials(f"http://u:{PASSWORD}@h:1") == "http://u:***@h:1"
    assert mask_credentials(f"https://{TOKEN}@h") == "https://***@h"
    assert mask_credentials(f"http://u:a/b?c#d@{PASSWORD}@h") == "http://u:***@h"
    assert mask_credentials(f"u:{PASSWORD}@h") == "u:***@h"
    assert mask_credentials(f"http://h/?t={PASSWORD}") == "http://h/?***"
    assert mask_credentials("http://h:11434") == "http://h:11434"
