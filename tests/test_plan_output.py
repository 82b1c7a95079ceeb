"""How a plan reads in a pull request: server-made text is inert Markdown, and the quality gate's verdict is one
decision per host (no llama.cpp, no hosts needed)."""

from __future__ import annotations

from so8t_deploy.build.plan import BuildPlan
from so8t_deploy.cli.console import plan_markdown
from so8t_deploy.deploy.plan import DeployPlan, PlannedTag
from so8t_deploy.rollout.host_plan import ActionKind, HostPlan, TagDecision, TagKind

HOSTILE = "502 | <script>alert(1)</script>\n**bold** [link](http://x) `code` ![img](x) # heading"


def deploy_plan(tags: list[PlannedTag], hosts: list[HostPlan]) -> DeployPlan:
    return DeployPlan(manifest="m.yaml", name="demo", manifest_digest="0" * 64, created_at="2026-12-02T00:00:00+00:00",
                      tool_version="0", llama_cpp="x", source="./model",
                      builds=BuildPlan(steps=[], tags=[], references=[]), tags=tags, hosts=hosts)


def test_host_error_text_in_markdown_is_escaped():
    plan = deploy_plan([], [HostPlan(target="gpu-a", url="http://h", error=HOSTILE)])
    text = plan_markdown(plan)
    [row] = [line for line in text.splitlines() if line.startswith("| gpu-a |")]
    assert row.count("|") - row.count("\\|") == 9  # the row's own cell separators only: the error stays in one cell
    for raw in ("<script>", "**bold**", "[link](", "`code`", "![img]"):
        assert raw not in text
    assert "\\<script\\>" in row and "\\*\\*bold\\*\\*" in row


def test_the_gates_verdict_is_one_decision_that_the_plan_shows_and_apply_runs():
    def decision(tag: str, kind: TagKind) -> TagDecision:
        return TagDecision(tag=tag, kind=kind, observed_digest=None, upload=True)

    host = HostPlan(target="a", url="http://h", decisions=[decision("demo:q4", TagKind.CREATE),
                                                           decision("demo:q8", TagKind.CREATE),
                                                           decision("demo:f16", TagKind.UNCHANGED)])
    held = host.gated({"demo:q4", "demo:f16"})  # f16 is on the host already: nothing to hold back there
    assert (held.tags(TagKind.HELD), held.tags(TagKind.CREATE), held.tags(TagKind.UNCHANGED)) == (
        ["demo:q4"], ["demo:q8"], ["demo:f16"])
    assert held.gated(set()) == host  # --force: every held create is a create again

    def planned(tag: str, gate: list[str]) -> PlannedTag:
        return PlannedTag(tag=tag, gguf_name="x.gguf", modelfile_digest="", identity=None, sha256=None, size=None,
                          gate=gate)

    plan = deploy_plan([planned("demo:q4", ["mean KL 0.5 > 0.1"]), planned("demo:q8", []), planned("demo:f16", [])],
                       [held])
    rows = [(a.kind, a.tag) for a in plan.actions(held)]
    assert rows == [(ActionKind.HELD, "demo:q4"), (ActionKind.UPLOAD, "demo:q8"), (ActionKind.CREATE, "demo:q8"),
                    (ActionKind.PROMOTE, "demo:q8"), (ActionKind.UNCHANGED, "demo:f16")]
    assert plan.actions(held)[0].detail == "mean KL 0.5 > 0.1" and plan.drifted == ["a"]
