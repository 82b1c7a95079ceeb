"""How a plan reads in a pull request: server-made text is inert Markdown (no llama.cpp, no hosts needed)."""

from __future__ import annotations

from so8t_deploy.build.plan import BuildPlan
from so8t_deploy.cli.console import plan_markdown
from so8t_deploy.deploy.plan import DeployPlan
from so8t_deploy.rollout.host_plan import HostPlan

HOSTILE = "502 | <script>alert(1)</script>\n**bold** [link](http://x) `code` ![img](x) # heading"


def test_host_error_text_in_markdown_is_escaped():
    plan = DeployPlan(manifest="m.yaml", name="demo", manifest_digest="0" * 64, created_at="2026-12-02T00:00:00+00:00",
                      tool_version="0", llama_cpp="x", source="./model", builds=BuildPlan(steps=[], tags=[],
                                                                                         references=[]),
                      tags=[], hosts=[HostPlan(target="gpu-a", url="http://h", error=HOSTILE)])
    text = plan_markdown(plan)
    [row] = [line for line in text.splitlines() if line.startswith("| gpu-a |")]
    assert row.count("|") - row.count("\\|") == 9  # the row's own cell separators only: the error stays in one cell
    for raw in ("<script>", "**bold**", "[link](", "`code`", "![img]"):
        assert raw not in text
    assert "\\<script\\>" in row and "\\*\\*bold\\*\\*" in row
