"""The Qt-free session: edits as data, undo/redo/merge, edit target, output protection,
supersede, run history and the pipeline steps (driven without Qt)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from core.base.errors import CompressionError, RecipeError, WorkbenchError
from core.base.methods import prune_method, prune_method_names, prune_methods, score_tensor
from core.base.progress import CancelToken
from core.recipe.edits import (
    KEEP,
    ReplacePlan,
    ResetLayers,
    SetPrune,
    SetPruneTarget,
    SetQuant,
    SetRecovery,
    SetSkip,
    SolvedPlan,
    apply_edit,
    edit_from_dict,
    protect_output,
    replay,
)
from core.recipe.plan import CompressionPlan, LayerConfig, PruneConfig, QuantConfig, RecoveryConfig
from core.session import SUPERSEDES, PlanHistory, RunRecord, Session


@pytest.fixture(scope="module")
def mlp_session() -> Session:
    s = Session()
    s.run(s.open_model("demo:mlp"))
    s.run(s.analyze(gradients=False))
    return s


def fresh(template: Session) -> Session:
    """A new session sharing the (read-only) loaded model and stats of ``template``."""
    s = Session()
    s.model, s.layers, s.output_layer = template.model, template.layers, template.output_layer
    s.train, s.test, s.data_name, s.stats = (
        template.train,
        template.test,
        template.data_name,
        template.stats,
    )
    s.history = PlanHistory(CompressionPlan())
    s.selection = template.selection
    return s


# --------------------------------------------------------------------------- configs validate


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: PruneConfig(sparsity=1.5), "sparsity"),
        (lambda: PruneConfig(sparsity=float("nan")), "sparsity"),
        (lambda: PruneConfig(threshold=-1.0), "threshold"),
        (lambda: PruneConfig(method="bogus"), "bogus"),
        (lambda: PruneConfig(mode="fast"), "mode"),
        (lambda: PruneConfig(n=4, m=4), "n/m"),
        (lambda: PruneConfig(method="channel_l1", scope="global"), "scope"),
        (lambda: QuantConfig(bits=1), "bits"),
        (lambda: QuantConfig(bits=True), "bits"),
        (lambda: QuantConfig(bias_bits=17), "bias_bits"),
        (lambda: RecoveryConfig(epochs=-1), "epochs"),
        (lambda: RecoveryConfig(alpha=2.0), "alpha"),
        (lambda: RecoveryConfig(lr=0.0), "lr"),
    ],
)
def test_configs_validate_themselves(make, field):
    with pytest.raises(RecipeError) as info:
        make()
    assert field in str(info.value)


def test_parser_reports_field_path_from_the_config():
    with pytest.raises(RecipeError, match=r"layers\.fc1\.quant\.bits"):
        CompressionPlan.from_dict({"layers": {"fc1": {"quant": {"bits": 40}}}})
    with pytest.raises(RecipeError, match=r"default\.prune\.sparsity"):
        CompressionPlan.from_dict({"default": {"prune": {"sparsity": 1.0}}})
    with pytest.raises(RecipeError, match=r"recovery\.alpha"):
        CompressionPlan.from_dict({"recovery": {"alpha": 3}})


# --------------------------------------------------------------------------- registry


def test_registry_drives_the_method_lists():
    from core.recipe import plan

    assert plan.PRUNE_METHODS == tuple(m.name for m in prune_methods())
    assert set(plan.STRUCTURED_METHODS) == {"channel_l1", "channel_l2"}
    assert set(plan.GRADIENT_METHODS) == {"gradient_stability", "taylor"}
    assert "nm" in prune_method_names(semi_structured=True)
    assert "magnitude" not in prune_method_names(semi_structured=True)
    assert all(m.help and m.label for m in prune_methods())
    with pytest.raises(RecipeError, match="unknown pruning method"):
        prune_method("nope")


def test_registry_scores_match_their_definitions():
    torch.manual_seed(0)
    w = torch.randn(6, 5)
    assert torch.equal(score_tensor("magnitude", w, None), w.abs())
    assert torch.allclose(score_tensor("channel_l1", w, None), w.abs().sum(1))
    assert torch.allclose(score_tensor("channel_l2", w, None), w.norm(dim=1))
    with pytest.raises(CompressionError, match="gradient"):
        score_tensor("taylor", w, None)
    with pytest.raises(ValueError):
        score_tensor("nm", w, None)


# --------------------------------------------------------------------------- pure edits


def test_whole_model_edit_reaches_default_and_overrides():
    plan = CompressionPlan().with_layer("fc1", LayerConfig(quant=QuantConfig(bits=8)))
    out = apply_edit(plan, SetQuant(bits=4))
    assert out.default.quant.bits == 4
    assert out.config_for("fc1").quant.bits == 4
    assert plan.config_for("fc1").quant.bits == 8  # pure: input unchanged


def test_layer_edit_makes_layer_scoped_override():
    plan = CompressionPlan(
        default=LayerConfig(prune=PruneConfig(method="magnitude", sparsity=0.5, scope="global"))
    )
    out = apply_edit(plan, SetPruneTarget(layers=("fc2",), mode="sparsity", value=0.8))
    cfg = out.config_for("fc2")
    assert cfg.prune.sparsity == 0.8 and cfg.prune.scope == "layer"
    assert out.default.prune.sparsity == 0.5


def test_target_edit_starts_magnitude_and_switching_to_channels_drops_global():
    plan = apply_edit(CompressionPlan(), SetPruneTarget(mode="sparsity", value=0.3))
    assert plan.default.prune.method == "magnitude"
    plan = apply_edit(plan, SetPrune(scope="global"))
    plan = apply_edit(plan, SetPrune(method="channel_l2"))
    assert plan.default.prune.scope == "layer"


def test_output_protection_follows_model_wide_channel_edits():
    plan = apply_edit(
        CompressionPlan(), SetPrune(method="channel_l1", sparsity=0.5), output_layer="head"
    )
    assert plan.config_for("head").prune.method == "none"
    # Back to an unstructured method: the automatic exemption disappears.
    plan = apply_edit(plan, SetPrune(method="magnitude"), output_layer="head")
    assert "head" not in plan.layer_overrides
    # A user's own setting of the head is never replaced by the protection.
    own = CompressionPlan().with_layer("head", LayerConfig(quant=QuantConfig(bits=6)))
    assert protect_output(own, "head") == own


def test_reset_skip_recovery_replace():
    plan = apply_edit(CompressionPlan(), SetSkip(layers=("fc1",), skip=True))
    assert plan.config_for("fc1").skip
    plan = apply_edit(plan, ResetLayers(layers=("fc1",)))
    assert plan.layer_overrides == {}
    plan = apply_edit(plan, SetRecovery(recovery=RecoveryConfig(epochs=3)))
    assert plan.recovery.epochs == 3
    other = CompressionPlan(default=LayerConfig(quant=QuantConfig(bits=5)))
    assert apply_edit(plan, ReplacePlan(plan=other)) == other


def test_edits_round_trip_through_json_and_replay():
    edits = [
        SetPruneTarget(mode="sparsity", value=0.6),
        SetQuant(layers=("fc1", "fc2"), bits=5, per_channel=True),
        SetPrune(layers=("fc3",), method="magnitude", mode="threshold", threshold=0.01),
        SetSkip(layers=("fc2",), skip=True),
        SetRecovery(recovery=RecoveryConfig(epochs=2, distill=True)),
        ReplacePlan(plan=CompressionPlan(default=LayerConfig(quant=QuantConfig(bits=7)))),
        ResetLayers(layers=("fc3",)),
    ]
    text = json.dumps([e.to_dict() for e in edits])
    again = [edit_from_dict(d) for d in json.loads(text)]
    assert again == edits
    assert replay(CompressionPlan(), again) == replay(CompressionPlan(), edits)
    assert SetQuant(bits=4).to_dict() == {"edit": "set_quant", "layers": [], "bits": 4}
    assert SetQuant(bits=None).bits is None and SetQuant().bits == KEEP
    with pytest.raises(RecipeError):
        edit_from_dict({"edit": "set_quant", "colour": 3})
    with pytest.raises(RecipeError):
        edit_from_dict({"edit": "explode"})


# --------------------------------------------------------------------------- history


def test_undo_redo_and_drag_merge(mlp_session):
    s = fresh(mlp_session)
    events = []
    s.subscribe(lambda name, payload: events.append(name))
    for value in (0.1, 0.2, 0.3, 0.4):  # one drag
        s.edit(SetPruneTarget(mode="sparsity", value=value))
    assert s.dragging
    assert s.end_merge()
    s.edit(SetQuant(bits=6))
    assert s.plan.default.prune.sparsity == 0.4 and s.plan.default.quant.bits == 6
    assert s.undo() and s.plan.default.quant.bits is None
    assert s.plan.default.prune.sparsity == 0.4
    assert s.undo() and s.plan == CompressionPlan()
    assert not s.undo()
    assert s.redo() and s.redo() and not s.redo()
    assert s.plan.default.quant.bits == 6
    assert "plan_changed" in events and "history_changed" in events and "drag_finished" in events
    # The recorded edits replay to the current plan.
    assert replay(CompressionPlan(), s.history.edits()) == s.plan
    # A new edit after undo drops the redo branch.
    s.undo()
    s.edit(SetQuant(bits=3))
    assert not s.history.can_redo


def test_a_drag_step_that_leaves_the_plan_keeps_the_last_edit():
    # Two target positions can solve to the same plan: the drag's one undo step must still
    # record where the drag ended, not where the plan last changed.
    small = CompressionPlan(default=LayerConfig(quant=QuantConfig(bits=4)))
    h = PlanHistory(CompressionPlan())
    first = SolvedPlan(plan=small, target=(("ratio", 7.0),))
    last = SolvedPlan(plan=small, target=(("ratio", 7.5),))
    assert h.push(small, first, "solve")
    assert not h.push(small, last, "solve")  # the plan is unchanged: nothing new to undo
    assert h.edits() == (last,) and h.plan == small
    h.end_merge()
    # Outside a drag an equal plan records nothing.
    assert not h.push(small, SolvedPlan(plan=small, target=(("ratio", 9.0),)), "solve")
    assert h.edits() == (last,)
    assert h.undo() and h.plan == CompressionPlan() and h.redo() and h.edits() == (last,)


def test_equal_plan_is_not_recorded(mlp_session):
    s = fresh(mlp_session)
    assert s.edit(SetQuant(bits=8))
    assert not s.edit(SetQuant(bits=8))
    assert s.history.can_undo and not s.history.can_redo


def test_edit_target_selection_vs_model(mlp_session):
    s = fresh(mlp_session)
    first = [layer.name for layer in s.layers if layer.prunable][0]
    s.set_selection((first,))
    s.set_target("selection")
    s.edit_targets(lambda layers: SetQuant(layers=layers, bits=4))
    assert s.plan.config_for(first).quant.bits == 4 and s.plan.default.quant.bits is None
    assert s.shown_config().quant.bits == 4
    s.set_target("model")
    assert s.shown_config().quant.bits is None
    s.edit_targets(lambda layers: SetQuant(layers=layers, bits=7))
    assert s.plan.default.quant.bits == 7 and s.plan.config_for(first).quant.bits == 7
    with pytest.raises(ValueError):
        s.set_target("global")  # the plan's pooling scope is not an edit target
    with pytest.raises(RecipeError, match="no layer"):
        s.edit(SetQuant(layers=("not_a_layer",), bits=4))


def test_session_protects_the_output_layer(mlp_session):
    s = fresh(mlp_session)
    assert s.output_layer is not None
    s.edit(SetPrune(method="channel_l1", sparsity=0.5))
    assert s.plan.config_for(s.output_layer).prune.method == "none"


# --------------------------------------------------------------------------- jobs


def test_supersede_cancels_and_drops_stale_jobs(mlp_session):
    s = fresh(mlp_session)
    s.edit(SetPruneTarget(mode="sparsity", value=0.5))
    first = s.compress()
    second = s.compress()
    assert first.cancel.cancelled and not second.cancel.cancelled
    assert not s.is_current(first)
    payload = first.fn(lambda f, m: None, CancelToken())
    assert not s.finish(first, payload)  # dropped
    assert s.result is None
    assert s.finish(second, second.fn(lambda f, m: None, second.cancel))
    assert s.result is not None and len(s.runs) == 1
    # A new load supersedes everything downstream.
    ev = s.evaluate()
    s.open_model("demo:mlp")
    assert ev.cancel.cancelled
    assert set(SUPERSEDES["load"]) >= set(SUPERSEDES) - {"load"}


def test_run_history_records_compress_and_evaluate(mlp_session):
    s = fresh(mlp_session)
    s.edit(SetPruneTarget(mode="sparsity", value=0.7))
    s.edit(SetQuant(bits=6))
    s.run(s.compress())
    s.run(s.evaluate())
    kinds = [r.kind for r in s.runs]
    assert kinds == ["compress", "evaluate"]
    rec = s.runs[-1]
    assert rec.plan == s.plan
    assert rec.accuracy_after is not None and rec.accuracy_before is not None
    assert rec.sparsity == pytest.approx(s.result.sparsity)
    assert 0 < rec.payload_bytes < rec.dense_bytes
    assert RunRecord.from_dict(json.loads(json.dumps(rec.to_dict()))) == rec
    assert not s.result_stale
    s.edit(SetQuant(bits=5))
    assert s.result_stale


def test_strict_and_lenient_rules(mlp_session, tmp_path):
    recipe = tmp_path / "r.json"
    plan = CompressionPlan().with_layer("ghost", LayerConfig(quant=QuantConfig(bits=4)))
    plan.save(recipe)
    lenient = fresh(mlp_session)
    notices = []
    lenient.subscribe(lambda n, p: notices.append(p) if n == "notice" else None)
    # A plan restored with the session is cleaned with a notice ...
    cleaned = lenient.checked_plan(plan)
    assert "ghost" not in cleaned.layer_overrides
    assert any("ghost" in str(n) for n in notices)
    # ... a recipe the user picks must fit the model, in every front end.
    with pytest.raises(RecipeError, match="ghost"):
        lenient.load_recipe(recipe)
    strict = fresh(mlp_session)
    strict.strict = True
    with pytest.raises(RecipeError, match="ghost"):
        strict.checked_plan(plan)
    # Recovery without data: lenient drops it, strict refuses.
    for session in (lenient, strict):
        session.train = None
        session.edit(SetRecovery(recovery=RecoveryConfig(epochs=2)))
    job = lenient.compress()
    assert lenient.run(job)[0].plan.recovery.epochs == 0
    with pytest.raises(CompressionError, match="training data"):
        strict.compress()


def test_steps_need_their_inputs():
    s = Session()
    with pytest.raises(WorkbenchError):
        s.analyze()
    with pytest.raises(WorkbenchError):
        s.compress()
    with pytest.raises(WorkbenchError):
        s.evaluate()


def test_data_step_labels_splits_and_supersedes(mlp_session, tmp_path):
    import numpy as np

    s = fresh(mlp_session)
    x = mlp_session.test.x[:50].numpy()
    np.savez(tmp_path / "d.npz", x=x)
    an = s.analyze()
    s.run(s.open_data(tmp_path / "d.npz"))
    assert an.cancel.cancelled
    assert s.train.y is not None  # labelled by the classifier itself
    assert len(s.train) + len(s.test) == 50
    assert s.data_name == "d.npz"


def test_plan_with_recovery_is_layer_config_compatible():
    plan = replace(CompressionPlan(), recovery=RecoveryConfig(epochs=1))
    assert apply_edit(plan, SetQuant(bits=4)).recovery.epochs == 1


def test_export_step_writes_one_consistent_directory(mlp_session, tmp_path):
    s = fresh(mlp_session)
    s.edit(SetPruneTarget(mode="sparsity", value=0.8))
    s.edit(SetQuant(bits=5))
    s.run(s.compress())
    s.run(s.evaluate())
    out = tmp_path / "out"
    records = s.run(s.export(["packed", "state_dict"], out))
    assert {r.path.name for r in records} == {"model.packed.safetensors", "model.pt"}
    report = json.loads((out / "report.json").read_text())
    assert report["compressed_bytes"] == (out / "model.packed.safetensors").stat().st_size
    assert CompressionPlan.load(out / "recipe.json") == s.plan
    assert not list(tmp_path.glob("*.partial"))
    # A user's own file in the folder survives a re-export.
    (out / "notes.txt").write_text("mine")
    s.run(s.export(["packed"], out, force=True))
    assert (out / "notes.txt").read_text() == "mine"


def test_loader_decisions_reach_every_front_end_as_notices(tmp_path):
    """A TorchScript file whose code defines __setstate__ opens weights-only; the session says
    why (the CLI prints it, the window shows it in the status bar)."""
    import torch

    class Stateful(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x)

        @torch.jit.export
        def __getstate__(self):
            return (self.fc.weight, self.training)

        @torch.jit.export
        def __setstate__(self, state: tuple[torch.Tensor, bool]):
            self.training = state[1]

    path = tmp_path / "stateful.pt"
    torch.jit.save(torch.jit.script(Stateful()), str(path))
    s = Session()
    notices = []
    s.subscribe(lambda name, payload: notices.append(payload) if name == "notice" else None)
    s.run(s.open_model(str(path)))
    assert s.model.weights_only
    assert any("opened weights-only" in str(n) and "__setstate__" in str(n) for n in notices)
