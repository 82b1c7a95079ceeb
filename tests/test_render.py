"""Modelfile rendering: Ollama's quoting rules, the built-in templates' Modelfile, custom templates."""

from __future__ import annotations

from pathlib import Path

import pytest

from so8t_deploy.builtin_templates import BUILTINS
from so8t_deploy.chat.setup import ChatSetup
from so8t_deploy.errors import ManifestError
from so8t_deploy.manifest.modelfile import ModelfileSyntaxError, parse_modelfile, quote
from so8t_deploy.manifest.schema import Modelfile
from so8t_deploy.rollout.render import render_modelfile

PHI3 = ChatSetup("phi3", BUILTINS["phi3"], ("<|end|>", "<|endoftext|>"))
UNCHECKED = ChatSetup("custom", None, ("</s>",))  # a custom template with nothing to check against


@pytest.mark.parametrize("value", [
    "0.7", "plain words", "multi\nline\ntext", ' leading space', 'say "hi" now', 'Use """triple""" quotes',
    'ends with "', '"quoted"', "tab\there", "<|end|>", "unicode ✓ text",
])
def test_quote_round_trips_through_ollamas_parser(value):
    parsed = parse_modelfile(f"FROM ./m.gguf\nSYSTEM {quote(value)}\n")
    assert parsed[1].args == value


def test_unwritable_values_are_refused_not_rendered_broken():
    with pytest.raises(ModelfileSyntaxError):
        quote('a line ending in """\nthen more')


@pytest.mark.parametrize("rune", ["\u00a0", "\u200d", "\u00ad", "\u2028", "\x1b", "\ufeff"])
def test_runes_ollamas_parser_drops_are_refused(rune):
    """`ollama create -f` keeps only runes Go's strconv.IsPrint accepts; the API create keeps them all."""
    assert parse_modelfile(f"FROM x\nSYSTEM a{rune}b\n")[1].args == "ab"
    with pytest.raises(ModelfileSyntaxError, match=f"U\\+{ord(rune):04X}"):
        quote(f"a{rune}b")


def test_printable_unicode_survives_the_parser():
    text = "héllo ✓ 世界 ﬁ \t tab"
    assert parse_modelfile(f"FROM x\nSYSTEM {quote(text)}\n")[1].args == text


def test_parser_follows_ollama_rules():
    commands = parse_modelfile('# comment\nFROM ./m.gguf\nPARAMETER stop <|end|>\nPARAMETER temperature 0.7\n'
                               'MESSAGE user "hello there"\nLICENSE """MIT\nlicense"""\n')
    assert [(c.name, c.args) for c in commands] == [
        ("model", "./m.gguf"), ("stop", "<|end|>"), ("temperature", "0.7"), ("message", "user: hello there"),
        ("license", "MIT\nlicense")]
    bad_modelfiles = ("PARAMETER\n", "FROM x\nBOGUS y\n", "SYSTEM hi\n", 'FROM x\nSYSTEM """open\n',
                      "FROM x\nMESSAGE robot hi\n")
    for bad in bad_modelfiles:
        with pytest.raises(ModelfileSyntaxError):
            parse_modelfile(bad)


def test_builtin_template_renders_its_go_template_and_the_derived_stops():
    rendered = render_modelfile(Modelfile(system="You are a helpful assistant.",
                                          parameters={"num_ctx": 4096, "stop": ["<|user|>", "<|end|>"]}),
                                Path("/cache/x/phi35-q4_k_m.gguf"), PHI3)
    assert rendered.text.startswith("FROM ./phi35-q4_k_m.gguf\n")
    assert rendered.template == BUILTINS["phi3"].text and "range .Messages" in rendered.template
    assert rendered.system == "You are a helpful assistant."
    # the setup's stops first, then the manifest's own, each once
    assert rendered.parameters == {"num_ctx": 4096, "temperature": 0.7,
                                   "stop": ["<|end|>", "<|endoftext|>", "<|user|>"]}


def test_system_prompt_with_triple_quotes_round_trips():
    system = 'Answer in """fenced""" blocks.\nUse "quotes" freely.'
    rendered = render_modelfile(Modelfile(system=system), Path("m.gguf"), PHI3)
    assert rendered.system == system
    assert parse_modelfile(rendered.text)[2].args == system


def test_manifest_refuses_a_system_prompt_no_modelfile_can_hold(tmp_path, run_cli):
    manifest = tmp_path / "m.yaml"
    manifest.write_text('apiVersion: so8t-deploy/v1\nname: x\nsource: {model: ./m}\nquantize: [q8_0]\n'
                        'modelfile:\n  system: "ends the line with \\"\\"\\"\\nthen more"\n')
    result = run_cli("validate", manifest)
    assert result.code == 2 and "modelfile.system: " in result.err and "cannot be written" in result.err


@pytest.mark.parametrize(("field", "yaml"), [
    ("modelfile.system", 'modelfile: {system: "no\\u00a0break"}'),
    ("modelfile.parameters", 'modelfile: {parameters: {stop: ["<|end|>", "zero\\u200bwidth"]}}'),
])
def test_manifest_refuses_text_that_a_modelfile_would_change(tmp_path, run_cli, field, yaml):
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"apiVersion: so8t-deploy/v1\nname: x\nsource: {{model: ./m}}\nquantize: [q8_0]\n{yaml}\n")
    result = run_cli("validate", manifest)
    assert result.code == 2 and f"{field}: " in result.err and "Modelfile parser drops" in result.err


def test_custom_template_is_sandboxed_and_strict(tmp_path):
    template = tmp_path / "mine.j2"
    template.write_text("FROM ./{{ gguf_file }}\nTEMPLATE {{ quote('{{ .Prompt }}') }}\n{{ undefined_name }}\n")
    with pytest.raises(ManifestError, match="mine.j2: template error: 'undefined_name' is undefined"):
        render_modelfile(Modelfile(template=str(template)), Path("m.gguf"), UNCHECKED)
    template.write_text("FROM ./{{ gguf_file }}\n{{ ''.__class__.__mro__ }}\n")
    with pytest.raises(ManifestError, match="template error"):
        render_modelfile(Modelfile(template=str(template)), Path("m.gguf"), UNCHECKED)
    template.write_text("FROM ./{{ gguf_file }}\nPARAMETER temperature 0.1\n")
    with pytest.raises(ManifestError, match="no TEMPLATE"):
        render_modelfile(Modelfile(template=str(template)), Path("m.gguf"), UNCHECKED)
    template.write_text("FROM ./{{ gguf_file }}\nTEMPLATE {{ quote('[INST] {{ .Prompt }} [/INST]') }}\n"
                        "{% for k, v in parameters %}PARAMETER {{ k }} {{ quote(v) }}\n{% endfor %}")
    rendered = render_modelfile(Modelfile(template=str(template)), Path("m.gguf"), UNCHECKED)
    assert rendered.template == "[INST] {{ .Prompt }} [/INST]" and rendered.parameters == {"temperature": 0.7}
    template.write_text("FROM ./{{ gguf_file }}\nTEMPLATE {{ quote('[INST] {{ .Prompt }} [/INST]') }}\n"
                        "{% for stop in stops %}PARAMETER stop {{ quote(stop) }}\n{% endfor %}")
    assert render_modelfile(Modelfile(template=str(template)), Path("m.gguf"), UNCHECKED).parameters == {
        "stop": ["</s>"]}
