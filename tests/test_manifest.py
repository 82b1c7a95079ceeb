"""Manifest v1: valid manifests load, and every kind of bad input is one line and exit 2."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import jsonschema
import pytest

from so8t_deploy.errors import ManifestError
from so8t_deploy.manifest.loader import load_manifest, parse_manifest

from .conftest import REPO

VALID = """\
apiVersion: so8t-deploy/v1
name: phi35-so8t
source:
  model: ./model
  adapters:
    - {kind: so8t, path: adapters/so8t}
bake:
  variants:
    full: {}
    light: {rotation: 0.1, ffn: 0.05, triality: 0.02}
quantize: [f16, Q8_0, q4_k_m]
modelfile:
  template: phi3
  system: "You are a helpful assistant."
  parameters: {temperature: 0.7, num_ctx: 4096, stop: ["<|end|>"]}
runtime: {backend: local, image: "so8t-deploy-worker:latest", gpus: none}
targets:
  - name: gpu-a
    host: http://127.0.0.1:11434
  - name: gpu-b
    host: https://ollama.example.com:443/
    headers: {Authorization: "Bearer secret-token"}
rollout: {canary: 1, parallelism: 4, on_failure: rollback, prune: false}
smoke:
  - {prompt: "Reply with the word hello.", expect: "(?i)hello", timeout_s: 120, min_tokens_per_second: 0}
"""


def write(tmp_path: Path, text: str, name: str = "m.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def edit(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


def test_valid_manifest_loads_with_defaults_and_resolution(tmp_path):
    manifest = load_manifest(write(tmp_path, VALID))
    assert manifest.source.model == str(tmp_path / "model")
    assert manifest.source.adapters[0].path == tmp_path / "adapters" / "so8t"
    assert manifest.quantize.types == ["f16", "q8_0", "q4_k_m"]
    assert manifest.tag("light", "q8_0") == "phi35-so8t:light-q8_0"
    assert manifest.targets[1].host == "https://ollama.example.com:443"
    assert manifest.modelfile.effective_parameters["temperature"] == 0.7
    assert "secret-token" not in repr(manifest)


def test_single_default_variant_uses_short_tags(tmp_path):
    text = VALID.split("bake:")[0] + "quantize: [q4_k_m]\n"
    manifest = load_manifest(write(tmp_path, text))
    assert list(manifest.bake.variants) == ["default"]
    assert manifest.tag("default", "q4_k_m") == "phi35-so8t:q4_k_m"
    assert manifest.modelfile.effective_parameters == {"temperature": 0.7}


def test_hub_ids_stay_ids_and_take_a_revision(tmp_path):
    text = edit(VALID, "model: ./model", "model: microsoft/Phi-3.5-mini-instruct\n  revision: main")
    manifest = load_manifest(write(tmp_path, text))
    assert manifest.source.model == "microsoft/Phi-3.5-mini-instruct"
    assert manifest.source.revision == "main"


def test_env_interpolation_with_defaults_and_escape(tmp_path):
    text = edit(VALID, "http://127.0.0.1:11434", "${HOST_A:-http://127.0.0.1:1}")
    text = edit(text, "Bearer secret-token", "Bearer ${TOKEN}")
    text = edit(text, "You are a helpful assistant.", "costs $${USD}")
    manifest = parse_manifest(text, tmp_path / "m.yaml", env={"TOKEN": "t0k"})
    assert manifest.targets[0].host == "http://127.0.0.1:1"
    assert manifest.targets[1].headers["Authorization"].get_secret_value() == "Bearer t0k"
    assert manifest.modelfile.system == "costs ${USD}"
    manifest = parse_manifest(text, tmp_path / "m.yaml", env={"TOKEN": "x", "HOST_A": "http://h:2"})
    assert manifest.targets[0].host == "http://h:2"


@pytest.mark.parametrize("path", sorted((REPO / "manifests").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_manifests_validate(run_cli, path, monkeypatch, tmp_path):
    """Each shipped manifest, beside the local inputs it names (validate checks that they exist and parse)."""
    from so8t_deploy.demo import init_demo
    from so8t_deploy.tiny_models import write_random_so8t_adapter

    for var in ("OLLAMA_HOST_A", "OLLAMA_HOST_B", "OLLAMA_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    copy = tmp_path / "manifests" / path.name
    copy.parent.mkdir()
    copy.write_text(path.read_text())
    result = run_cli("validate", copy)
    assert result.code == 2 and "directory not found" in result.err  # its inputs are not there yet
    if path.name == "demo.yaml":
        init_demo(tmp_path / ".so8t" / "demo")  # what `make demo` does first
    else:  # the production manifest: a hub model (checked once downloaded) and a Phi-3.5-sized adapter
        write_random_so8t_adapter(tmp_path / "adapters" / "phi35-so8t", 3072, 32)
    result = run_cli("validate", copy)
    assert result.code == 0, result.err
    assert result.out.strip().endswith(": ok")


def test_schema_is_valid_json_schema_and_describes_fields(run_cli):
    result = run_cli("schema")
    assert result.code == 0
    schema = json.loads(result.out)
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["additionalProperties"] is False
    assert "apiVersion" in schema["required"]
    assert schema["$defs"]["Target"]["properties"]["host"]["description"]
    undescribed = [f"{where}.{name}" for where, model in [("manifest", schema), *schema["$defs"].items()]
                   for name, prop in model.get("properties", {}).items() if not prop.get("description")]
    assert undescribed == []  # every field, top-level sections included, says what it is for


# (edit to VALID, field path expected in the message, a fragment of the explanation)
INVALID = {
    "unknown-top-key": (("quantize:", "quantise: [f16]\nquantize:"), "quantise", "unknown key"),
    "typo-hides-nothing": (("quantize:", "quantise:"), "quantise", "unknown key; did you mean 'quantize'?"),
    "nested-typo": (("timeout_s: 120", "timeout: 120"), "smoke[0].timeout", "did you mean 'timeout_s'?"),
    "variant-typo": (("ffn: 0.05", "fnn: 0.05"), "bake.variants.light.fnn", "did you mean 'ffn'?"),
    "unknown-nested-key": (("  template: phi3", "  templat: phi3"), "modelfile.templat", "unknown key"),
    "wrong-api-version": (("so8t-deploy/v1", "so8t-deploy/v2"), "apiVersion", "so8t-deploy/v1"),
    "missing-name": (("name: phi35-so8t\n", ""), "name", "required"),
    "uppercase-name": (("name: phi35-so8t", "name: Phi35"), "name", "must match"),
    "name-with-space": (("name: phi35-so8t", "name: 'phi 35'"), "name", "must match"),
    "name-too-long": (("name: phi35-so8t", "name: " + "a" * 65), "name", "at most 64"),
    "bad-quant": (("q4_k_m]", "q4_k_z]"), "quantize", "unknown quant type 'q4_k_z'"),
    "duplicate-quant": (("q4_k_m]", "Q4_K_M, q4_k_m]"), "quantize", "duplicate quant type"),
    "imatrix-quant": (("q4_k_m]", "iq2_xs]"), "quantize", "importance matrix"),
    "iq-without-imatrix": (("q4_k_m]", "iq4_xs]"), "quantize", "iq4_xs needs an importance matrix: declare "
                           "quantize.imatrix"),
    **{f"imatrix-{case}": (("quantize: [f16, Q8_0, q4_k_m]",
                            f"quantize: {{{body}}}" if "types" in body else f"quantize: {{types: [q4_k_m], {body}}}"),
                           "quantize" + where, fragment)
       for case, body, where, fragment in [
           ("two-sources", "imatrix: {text: a.txt, chat: b.jsonl}", ".imatrix", "exactly one of text:"),
           ("no-source", "imatrix: {ctx: 512}", ".imatrix", "exactly one of text:"),
           ("chat-not-jsonl", "imatrix: {chat: b.json}", ".imatrix", "must be a .jsonl"),
           ("unknown-key", "imatrix: {text: a.txt, chunk: 3}", ".imatrix.chunk", "did you mean 'chunks'?"),
           ("small-ctx", "imatrix: {text: a.txt, ctx: 8}", ".imatrix.ctx", "greater than or equal to 32"),
           ("zero-chunks", "imatrix: {text: a.txt, chunks: 0}", ".imatrix.chunks", "greater than or equal to 1"),
           ("split-unit", "split_max_size: 50X", ".split_max_size", "such as 500M or 50G"),
           ("split-zero", "split_max_size: 0", ".split_max_size", "positive byte count"),
           ("types-typo", "type: [q4_k_m]", ".type", "unknown key"),
           ("bad-type-in-mapping", "imatrix: {text: a.txt}, types: [q9]", "", "unknown quant type 'q9'"),
       ]},
    "split-with-targets": (("quantize: [f16, Q8_0, q4_k_m]", "quantize: {types: [f16], split_max_size: 50G}"),
                           "targets", "Ollama cannot import split GGUFs"),
    "eval-on-calibration": (("quantize: [f16, Q8_0, q4_k_m]", "quantize: {types: [f16], imatrix: {text: c.txt}}\n"
                             "quality: {eval_text: c.txt}"), "quality", "held-out text"),
    "empty-quant": (("[f16, Q8_0, q4_k_m]", "[]"), "quantize", "at least one"),
    "bad-url-scheme": (("http://127.0.0.1:11434", "htp:/x"), "targets[0].host", "invalid URL 'htp:/x'"),
    "bad-url-port": (("http://127.0.0.1:11434", "http://h:99999"), "targets[0].host", "invalid URL"),
    "url-with-path": (("http://127.0.0.1:11434", "http://h:1/api"), "targets[0].host", "no path"),
    "duplicate-target": (("name: gpu-b", "name: gpu-a"), "targets", "duplicate target name 'gpu-a'"),
    "bad-target-name": (("name: gpu-b", "name: GPU_B"), "targets[1].name", "must match"),
    "bad-variant-name": (("    light:", "    Light Variant:"), "bake.variants", "variant name"),
    "unknown-scale-group": (("ffn: 0.05", "mlp: 0.05"), "bake.variants.light.mlp", "unknown key"),
    "non-numeric-scale": (("ffn: 0.05", "ffn: lots"), "bake.variants.light.ffn", "number"),
    "bad-dtype": (("bake:\n", "bake:\n  dtype: int8\n"), "bake.dtype", "int8"),
    "bad-backend": (("backend: local", "backend: k8s"), "runtime.backend", "k8s"),
    "bad-gpus": (("gpus: none", "gpus: 0"), "runtime.gpus", "positive count (at most 1024), got 0"),
    "bad-adapter-kind": (("kind: so8t", "kind: dora"), "source.adapters[0].kind", "dora"),
    "unknown-option": (("num_ctx: 4096", "num_ctxx: 4096"), "modelfile.parameters", "unknown Ollama option"),
    "option-type": (("num_ctx: 4096", "num_ctx: big"), "modelfile.parameters", "'num_ctx' must be of type int"),
    "unknown-template": (("template: phi3", "template: phi9"), "modelfile.template", "unknown built-in"),
    "bad-on-failure": (("on_failure: rollback", "on_failure: pray"), "rollout.on_failure", "pray"),
    "canary-over-targets": (("canary: 1", "canary: 3"), "rollout", "exceeds the number of targets"),
    "zero-parallelism": (("parallelism: 4", "parallelism: 0"), "rollout.parallelism", "greater than"),
    "bad-regex": (('expect: "(?i)hello"', 'expect: "(unclosed"'), "smoke[0].expect", "invalid regular"),
    "negative-timeout": (("timeout_s: 120", "timeout_s: -1"), "smoke[0].timeout_s", "greater than"),
    "infinite-timeout": (("timeout_s: 120", "timeout_s: .inf"), "smoke[0].timeout_s", "finite number"),
    "huge-timeout": (("timeout_s: 120", "timeout_s: 1e400"), "smoke[0].timeout_s", "finite number"),
    "week-plus-timeout": (("timeout_s: 120", "timeout_s: 604801"), "smoke[0].timeout_s", "less than or equal"),
    "bad-keep-alive": (("min_tokens_per_second: 0}", "keep_alive: forever}"), "smoke[0].keep_alive",
                       "Go duration"),
    "bad-seed": (("min_tokens_per_second: 0}", "seed: -5}"), "smoke[0].seed", "greater than or equal"),
    "bad-host-timeout": (("host: http://127.0.0.1:11434", "host: http://127.0.0.1:11434\n    timeout_s: 0"),
                         "targets[0].timeout_s", "greater than"),
    "revision-on-local": (("model: ./model", "model: ./model\n  revision: main"), "source.revision", "hub"),
    "unset-env-var": (("Bearer secret-token", "Bearer ${SO8T_TEST_UNSET}"), "targets[1].headers.Authorization",
                      "'SO8T_TEST_UNSET' is not set"),
    **{f"registry-{case}": (("name: phi35-so8t", f"name: {name}\ndistribution: {{registry: {{{registry}}}}}"),
                            "distribution" + where, fragment)
       for case, name, registry, where, fragment in [
           ("http-not-insecure", "a", "url: 'http://r:5000', namespace: so8t", ".registry", "insecure: true"),
           ("https-insecure", "a", "url: 'https://r', namespace: so8t, insecure: true", ".registry", "plain http"),
           ("path", "a", "url: 'https://r/v2', namespace: so8t", ".registry.url", "no path"),
           ("credentials", "a", "url: 'https://u:pw@r', namespace: so8t", ".registry.url", "registry.auth"),
           ("namespace-dot", "a", "url: 'https://r', namespace: so.8t", ".registry.namespace", "lowercase"),
           ("namespace-case", "a", "url: 'https://r', namespace: So8t", ".registry.namespace", "lowercase"),
           ("unknown-key", "a", "url: 'https://r', namespace: s, tls: false", ".registry.tls", "unknown key"),
           ("username-colon", "a", "url: 'https://r', namespace: s, auth: {username: 'a:b', password: pw}",
            ".registry.auth.username", "':'"),
           ("repository-name", "a-", "url: 'https://r', namespace: s", "", "OCI repository name"),
       ]},
    "distribution-typo": (("name: phi35-so8t", "name: a\ndistribution: pull"), "distribution", "'push' or"),
    "duplicate-yaml-key": (("name: phi35-so8t", "name: a\nname: b"), "", "duplicate key 'name'"),
    "invalid-yaml": (("name: phi35-so8t", "name: [unclosed"), "", "invalid YAML"),
}


@pytest.mark.parametrize("case", sorted(INVALID), ids=str)
def test_invalid_manifest_is_one_line_exit_2(run_cli, tmp_path, monkeypatch, case):
    monkeypatch.delenv("SO8T_TEST_UNSET", raising=False)
    (old, new), field, fragment = INVALID[case]
    path = write(tmp_path, edit(VALID, old, new), name=f"{case}.yaml")
    result = run_cli("validate", path)
    assert result.code == 2
    assert result.out == ""
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert "Traceback" not in result.err
    assert lines[0].startswith(f"{path}"), lines[0]
    if field:
        assert f": {field}: " in lines[0] or f": {field}." in lines[0], lines[0]
    assert fragment in lines[0], lines[0]


def test_a_tag_and_its_companion_suffixes_fit_ollamas_80_characters(run_cli, tmp_path):
    variant = "v" * 63
    fits = edit(VALID, "    light:", f"    {variant}:")  # '{variant}-q4_k_m-candidate' is exactly 80
    load_manifest(write(tmp_path, fits, "fits.yaml"))  # the schema accepts it
    too_long = edit(fits, "quantize: [f16, Q8_0, q4_k_m]",
                    "quantize: {types: [f16, Q8_0, iq3_xxs], imatrix: {text: calibration.txt}}")
    result = run_cli("validate", write(tmp_path, too_long, "long.yaml"))
    assert result.code == 2 and f": bake.variants.{variant}: the tag '{variant}-iq3_xxs'" in result.err
    assert "longer than Ollama's 80 characters" in result.err


def test_missing_file_and_non_mapping(run_cli, tmp_path):
    result = run_cli("validate", tmp_path / "nope.yaml")
    assert result.code == 2 and "nope.yaml: cannot read manifest" in result.err
    result = run_cli("validate", write(tmp_path, "- just\n- a list\n"))
    assert result.code == 2 and "must be a YAML mapping" in result.err


def test_verbose_flag_shows_traceback(run_cli, tmp_path):
    result = run_cli("-v", "validate", write(tmp_path, edit(VALID, "name: phi35-so8t", "name: BAD")))
    assert result.code == 2
    assert "Traceback" in result.err


def test_loader_raises_manifest_error_with_field_path(tmp_path):
    with pytest.raises(ManifestError, match=r"targets\[0\]\.host: invalid URL"):
        load_manifest(write(tmp_path, edit(VALID, "http://127.0.0.1:11434", "ftp://x")))


def test_verbose_works_after_the_command_too(run_cli, tmp_path):
    bad = write(tmp_path, edit(VALID, "name: phi35-so8t", "name: BAD"))
    for args in (("-v", "validate", bad), ("validate", bad, "-v"), ("validate", "--verbose", bad)):
        result = run_cli(*args)
        assert result.code == 2 and "Traceback" in result.err, args
        assert result.err.strip().splitlines()[-1].startswith(f"{bad}: name: ")
