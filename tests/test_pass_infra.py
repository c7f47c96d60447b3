"""The pass manager contract: modified flag, precondition/check failures, instruments."""

from __future__ import annotations

import io

import pytest
import torch
import torch.fx as fx
from torch import nn

import fxprune
from fxprune import meta
from fxprune.artifacts import GROUPS, PLAN, SCORES, SELECTION
from fxprune.errors import PassError, PostconditionError, PreconditionError, VerificationError
from fxprune.pass_infra import (
    DumpGraphs,
    Pass,
    PassContext,
    PassManager,
    PassResult,
    PrintAfterEach,
    TimePasses,
)
from fxprune.passes import BuildGroupsPass, PropagateChannelsPass


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 2)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def traced() -> fx.GraphModule:
    return fxprune.trace(Tiny().eval(), torch.randn(2, 4))


class ReluToGelu(Pass):
    """Rewrites relu to gelu: modified exactly when it finds one."""

    def call(self, gm, ctx):
        changed = False
        for n in gm.graph.nodes:
            if n.op == "call_function" and n.target is torch.relu:
                n.target = torch.nn.functional.gelu
                changed = True
        gm.recompile()
        return PassResult(gm, changed)


class BreaksGraph(Pass):
    def call(self, gm, ctx):
        first = next(n for n in gm.graph.nodes if n.op == "placeholder")
        b = next(n for n in gm.graph.nodes if n.target == "b")
        first.append(b)  # b now runs before its input exists: lint must catch it
        return PassResult(gm, True)


class CorruptsLayout(Pass):
    def call(self, gm, ctx):
        from fxprune.channels import Layout

        node = next(n for n in gm.graph.nodes if n.target == "a")
        meta.put(node, meta.LAYOUT, Layout(torch.zeros(3, 3, 3, dtype=torch.long).numpy()))
        return PassResult(gm, False)


class NeedsLayout(Pass):
    requires = (meta.LAYOUT,)

    def call(self, gm, ctx):
        return PassResult(gm, False)


class PromisesGroups(Pass):
    provides = (meta.GROUP,)

    def call(self, gm, ctx):
        return PassResult(gm, False)


def test_modified_flag_is_part_of_the_contract():
    gm = traced()
    assert ReluToGelu()(gm).modified is True
    assert ReluToGelu()(gm).modified is False  # nothing left to rewrite
    res = PassManager([ReluToGelu(), ReluToGelu()]).run(traced())
    assert res.modified is True


def test_analysis_passes_do_not_modify_the_graph():
    gm = traced()
    code = gm.code
    ctx = PassContext()
    res = PassManager([PropagateChannelsPass(), BuildGroupsPass()], check=True).run(gm, ctx)
    assert res.modified is False and gm.code == code
    assert ctx.results["groups"]


def test_check_failure_names_the_pass_and_those_before_it():
    with pytest.raises(PassError) as info:
        PassManager([ReluToGelu(), BreaksGraph()], check=True).run(traced())
    text = str(info.value)
    assert "BreaksGraph" in text and "passes run before it: ReluToGelu" in text
    with pytest.raises(PostconditionError, match=r"CorruptsLayout.*does not fit its shape"):
        PassManager([CorruptsLayout()], check=True).run(traced())
    PassManager([CorruptsLayout()], check=False).run(traced())  # checks only when asked


class FailsVerification(Pass):
    def call(self, gm, ctx):
        raise VerificationError("pruned output differs from the masked original")


class Crashes(Pass):
    def call(self, gm, ctx):
        return 1 / 0


def test_fxprune_errors_keep_their_type_and_name_the_pass_in_a_note():
    with pytest.raises(VerificationError) as info:
        PassManager([ReluToGelu(), FailsVerification()]).run(traced())
    assert not isinstance(info.value, PassError)  # callers catch VerificationError by type
    assert str(info.value) == "pruned output differs from the masked original"
    assert info.value.__notes__ == [
        "pass FailsVerification failed (passes run before it: ReluToGelu)"
    ]
    # anything else is still wrapped into a PassError naming the pass
    with pytest.raises(PassError, match=r"Crashes failed \(passes run before it: none\): Zero"):
        PassManager([Crashes()]).run(traced())


def test_preconditions_and_postconditions():
    with pytest.raises(PreconditionError, match=r"NeedsLayout requires .*fxprune.layout"):
        PassManager([NeedsLayout()]).run(traced())
    PassManager([PropagateChannelsPass(), NeedsLayout()]).run(traced())  # satisfied
    with pytest.raises(PostconditionError, match="PromisesGroups promised"):
        PassManager([PromisesGroups()]).run(traced())


def test_instruments_print_dump_and_time(tmp_path):
    stream = io.StringIO()
    timer = TimePasses()
    dump = DumpGraphs(tmp_path / "dump")
    PassManager(
        [PropagateChannelsPass(), ReluToGelu()],
        instruments=[PrintAfterEach(stream), dump, timer],
        use_env=False,
    ).run(traced())
    out = stream.getvalue()
    assert "after 000 PropagateChannelsPass (modified=False)" in out
    assert "after 001 ReluToGelu (modified=True)" in out and "gelu" in out
    files = sorted(p.name for p in (tmp_path / "dump").iterdir())
    assert files == ["000_PropagateChannelsPass.txt", "001_ReluToGelu.txt"]
    assert "gelu" in (tmp_path / "dump" / "001_ReluToGelu.txt").read_text()
    assert [name for name, _ in timer.times] == ["PropagateChannelsPass", "ReluToGelu"]
    assert "total" in str(timer)


def test_fxprune_debug_env_turns_printing_on(monkeypatch, capsys):
    monkeypatch.setenv("FXPRUNE_DEBUG", "1")
    PassManager([ReluToGelu()]).run(traced())
    assert "after 000 ReluToGelu" in capsys.readouterr().err


def test_printer_rows_and_diff():
    from fxprune.debug import format_diff, format_graph

    gm = traced()
    PassManager([PropagateChannelsPass(), BuildGroupsPass()]).run(gm, PassContext())
    text = format_graph(gm)
    lines = text.splitlines()
    assert lines[0].split() == ["node", "op", "target", "shape", "group", "kept", "source"]
    assert len(lines) == 2 + len(gm.graph.nodes)
    a_row = next(line for line in lines if line.startswith("a "))
    assert (
        "linear" in a_row and "[2, 8]" in a_row and "g" in a_row and "test_pass_infra.py" in a_row
    )
    before = format_graph(gm)
    ReluToGelu()(gm)
    diff = format_diff(before, gm)
    assert "-relu" in diff and "+relu" in diff and "gelu" in diff


# -- typed artifacts ---------------------------------------------------------------------------
class WritesGroupsUndeclared(Pass):
    def call(self, gm, ctx):
        ctx[GROUPS] = []
        return PassResult(gm, False)


class WritesScoresWrongType(Pass):
    provides = (SCORES,)

    def call(self, gm, ctx):
        ctx[SCORES] = "not a dict"
        return PassResult(gm, False)


class Records(Pass):
    """Appends its name to a list: shows which passes ran."""

    def __init__(self, name, log, requires=(), provides=()):
        self._name, self.log = name, log
        self.requires, self.provides = requires, provides

    @property
    def name(self):
        return self._name

    def call(self, gm, ctx):
        self.log.append(self.name)
        for artifact in self.provides:
            if not isinstance(artifact, str):
                ctx[artifact] = {}
        return PassResult(gm, False)


def test_a_pass_may_write_only_the_artifacts_it_declares():
    with pytest.raises(PostconditionError, match=r"WritesGroupsUndeclared wrote artifact 'groups'"):
        PassManager([WritesGroupsUndeclared()]).run(traced())
    with pytest.raises(PassError, match=r"artifact 'scores' must be a dict, got str"):
        PassManager([WritesScoresWrongType()]).run(traced())


def test_a_missing_artifact_fails_before_any_pass_runs():
    log = []
    first = Records("First", log, provides=(SCORES,))
    needs = Records("NeedsSelection", log, requires=(SELECTION,))
    with pytest.raises(PreconditionError) as info:
        PassManager([first, needs]).run(traced())
    assert log == []  # nothing expensive ran
    assert "NeedsSelection requires artifacts ['selection']" in str(info.value)
    assert "from SelectChannelsPass" in str(info.value)
    # seeded by the caller, the same pipeline runs
    PassManager([first, needs]).run(traced(), PassContext(artifacts={SELECTION: {}}))
    assert log == ["First", "NeedsSelection"]


def test_reading_a_missing_artifact_names_its_provider():
    with pytest.raises(PreconditionError, match=r"'plan' is not available: PlanChannelsPass"):
        PassContext()[PLAN]


def test_a_pass_manager_is_a_pass_and_nests():
    log = []
    inner = PassManager(
        [Records("A", log, provides=(SCORES,)), Records("B", log, requires=(SCORES,))],
        name="inner",
    )
    assert isinstance(inner, Pass) and inner.name == "inner"
    assert inner.provides == (SCORES,) and inner.requires == ()
    outer = PassManager([inner, Records("C", log, requires=(SCORES,))])
    outer.run(traced())
    assert log == ["A", "B", "C"]


def test_meta_keys_count_only_once_provided_and_not_invalidated():
    gm = traced()
    PropagateChannelsPass()(gm)
    NeedsLayout()(gm)  # provided
    next(iter(gm.graph.nodes)).meta[meta.GROUP] = 0  # a stray key set by hand is not a promise
    with pytest.raises(PreconditionError, match=r"fxprune\.group"):
        NeedsGroups()(gm)


class NeedsGroups(Pass):
    requires = (meta.GROUP,)

    def call(self, gm, ctx):
        return PassResult(gm, False)


def test_prune_is_one_pipeline_that_instruments_see_whole():
    timer = TimePasses()
    model = Tiny().eval()
    fxprune.prune(model, torch.randn(2, 4), ratio=0.5, verify=True, instruments=[timer])
    assert [name for name, _ in timer.times] == [
        "SnapshotPass",
        "PropagateChannelsPass",
        "BuildGroupsPass",
        "ImportancePass",
        "SelectChannelsPass",
        "PlanChannelsPass",
        "SurgeryPass",
        "VerifyPass",
    ]
    timer = TimePasses()
    fxprune.prune(model, torch.randn(2, 4), target_macs=0.5, verify=False, instruments=[timer])
    assert "TargetMacsPass" in [name for name, _ in timer.times]
