"""The window on a ResNet-50-shaped model (107 layers) and the run history / Pareto view.

The model is generated here: ResNet-50's layer structure (stem, 3-4-6-3 bottlenecks with
downsample branches, fc: 53 convs + 53 BatchNorms + 1 linear) at a few channels per layer,
so the layer count is real and the tests stay fast.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PySide6.QtCore import QSettings
from torch import nn

from app.main_window import MainWindow
from app.widgets.histogram_view import level_stride
from app.widgets.layer_table import NAME_ROLE, OVERRIDE_MARK, OVERRIDE_ROLE
from app.widgets.runs_view import CompareDialog, compare_plans, damage, pareto_front
from app.widgets.size_view import OTHERS, TOP_N
from app.widgets.summary_panel import summary_texts
from core.recipe.edits import SetQuant
from core.recipe.plan import CompressionPlan, simple_plan, starting_plan
from core.session import RunRecord
from tests.models import ResNet50

TIMEOUT = 120_000


def save_resnet50_shaped(path: str) -> None:
    """Build the model and save it as TorchScript (run in a child process, see below)."""
    torch.manual_seed(0)
    model = ResNet50(base=4, classes=10).eval()
    with torch.no_grad():
        # Trained-looking BatchNorm statistics (not the init's 0/1), so buffers are real data.
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        model(torch.randn(2, 3, 32, 32))
    torch.jit.save(torch.jit.script(model), path)


@pytest.fixture(scope="module")
def resnet50_file(tmp_path_factory) -> Path:
    # Scripted in a child process: TorchScript's per-process type cache would otherwise
    # rename (mangle) later scripted nn.Sequential classes of other tests in this process.
    path = tmp_path_factory.mktemp("models") / "resnet50_shaped.ts.pt"
    code = (
        "import sys; sys.path.insert(0, sys.argv[2]); "
        "from tests.app.test_real_models import save_resnet50_shaped; "
        "save_resnet50_shaped(sys.argv[1])"
    )
    root = str(Path(__file__).resolve().parents[2])
    subprocess.run([sys.executable, "-c", code, str(path), root], check=True, timeout=300)
    return path


def make_window(qtbot, settings, size=(1366, 768)) -> MainWindow:
    w = MainWindow(settings)
    qtbot.addWidget(w)
    w.resize(*size)
    w.show()
    return w


@pytest.fixture
def window(qtbot, settings):
    w = make_window(qtbot, settings)
    yield w
    w.controller.shutdown()


def open_ready(qtbot, w: MainWindow, source) -> None:
    c = w.controller
    w.open_model(str(source))
    qtbot.waitUntil(lambda: c.stats is not None and not c.busy(), timeout=TIMEOUT)


def wait_idle(qtbot, w: MainWindow) -> None:
    qtbot.waitUntil(lambda: not w.controller.busy(), timeout=TIMEOUT)


def test_generated_model_is_resnet50_shaped(qtbot, window, resnet50_file):
    open_ready(qtbot, window, resnet50_file)
    layers = window.controller.layers
    kinds = [layer.type for layer in layers]
    assert len(layers) == 107
    assert (kinds.count("Conv2d"), kinds.count("BatchNorm2d"), kinds.count("Linear")) == (
        53,
        53,
        1,
    )


# ---------------------------------------------------------------------- defects
def test_threshold_mode_sparsity_slider_shows_implied_sparsity(qtbot, window, resnet50_file):
    open_ready(qtbot, window, resnet50_file)
    c, panel = window.controller, window.prune_panel
    panel.sparsity.setValue(800)
    window._end_drag()
    panel.by_threshold.setChecked(True)
    assert c.plan.default.prune.mode == "threshold"
    # A lower threshold than the one 80 % implied: the real sparsity drops well below 80 %.
    panel.threshold.setValue(panel.threshold.value() // 2)
    window._end_drag()
    shown = c.selection[0]
    lp = c.preview.layer(shown)
    assert c.plan.default.prune.sparsity == pytest.approx(0.8)  # the stale target
    assert lp.sparsity < 0.7
    assert panel.sparsity.value() == round(lp.sparsity * 1000)
    assert panel.sparsity_label.text() == f"{100 * lp.sparsity:.1f} %"


def test_override_marked_and_shown_with_its_settings_under_whole_model(
    qtbot, window, resnet50_file
):
    open_ready(qtbot, window, resnet50_file)
    c = window.controller
    c.edit(SetQuant(layers=(), bits=4))
    own = "layer2.0.conv2"
    c.edit(SetQuant(layers=(own,), bits=8))
    table = window.layer_table.model
    row = table.row_of(own)
    assert table.index(row, 0).data() == f"{OVERRIDE_MARK} {own}"
    assert table.index(row, 0).data(OVERRIDE_ROLE) and table.index(row, 0).data(NAME_ROLE) == own
    other = table.row_of("layer2.0.conv1")
    assert not table.index(other, 0).data(OVERRIDE_ROLE)
    assert table.index(row, 0).data(0x0006).bold()  # FontRole

    assert c.target == "model"
    c.set_selection((own,))
    # Histogram and sliders agree on the shown layer's own settings (8 bit, not the default 4).
    assert window.histograms._bits == 8
    assert window.quant_panel.bits.value() == 8
    assert own in window.scope_note.text()
    # A different sparsity on that layer only: the slider shows it, not the default's 0.
    c.set_target("selection")
    window.prune_panel.sparsity.setValue(300)
    window._end_drag()
    c.set_target("model")
    assert window.prune_panel.sparsity.value() == 300
    # Moving the whole-model bit width sets it everywhere: the slider stays in step.
    window.quant_panel.bits.setValue(6)
    window._end_drag()
    assert c.plan.config_for(own).quant.bits == 6 and window.histograms._bits == 6
    assert window.quant_panel.bits.value() == 6
    c.set_selection(("layer2.0.conv1",))
    assert window.prune_panel.sparsity.value() == 0 and window.histograms._bits == 6


def test_fine_tune_evaluate_export_disabled_while_compress_runs(qtbot, window):
    open_ready(qtbot, window, "demo:mlp")
    c = window.controller
    c.set_plan(simple_plan(0.5, 6, "magnitude"))
    c.compress()
    qtbot.waitUntil(lambda: c.result is not None and not c.busy(), timeout=TIMEOUT)
    assert window.act_export.isEnabled() and window.act_evaluate.isEnabled()
    c.compress()
    assert c.busy("compress")
    for act in (window.act_finetune, window.act_evaluate, window.act_export):
        assert not act.isEnabled(), act.text()
    wait_idle(qtbot, window)
    assert window.act_export.isEnabled() and window.act_evaluate.isEnabled()


def test_axes_print_plain_numbers_with_units(qtbot, window, resnet50_file):
    open_ready(qtbot, window, resnet50_file)
    for plot in (window.histograms.plot, window.histograms.grad_plot, window.size_view.plot):
        for side in ("left", "bottom"):
            axis = plot.getAxis(side)
            assert not axis.autoSIPrefix
            assert "(x" not in axis.labelString()
    # The weights are ~0.1: with SI prefixes pyqtgraph would label them "(x0.001)" in mW-style.
    assert window.size_view.plot.getAxis("bottom").labelText in ("size (KiB)", "size (MiB)")


def test_quantization_grid_drawn_sparsely_when_denser_than_pixels(qtbot, window, resnet50_file):
    assert level_stride(255, 1.0, 1.0, 400.0) == 4  # 255 levels on 400 px: every 4th
    assert level_stride(15, 1.0, 1.0, 400.0) == 1
    open_ready(qtbot, window, resnet50_file)
    c = window.controller
    c.set_selection(("layer3.0.conv2",))
    c.edit(SetQuant(layers=(), bits=8))
    xs, _ = window.histograms.levels.getData()
    drawn = 0 if xs is None else len(xs) // 2
    pixels = window.histograms.plot.getPlotItem().vb.width()
    assert 0 < drawn <= pixels / 4 and drawn < 255
    assert "every" in window.histograms.caption.text()
    c.edit(SetQuant(layers=(), bits=3, symmetric=True, per_channel=False))
    xs, _ = window.histograms.levels.getData()
    assert len(xs) // 2 == 2**3 - 1  # symmetric 3 bit: all 7 levels fit


def test_legends_are_out_of_the_data(qtbot, window, resnet50_file):
    open_ready(qtbot, window, resnet50_file)
    for plot in (window.histograms.plot, window.histograms.grad_plot):
        assert plot.getPlotItem().legend is None
    assert "original" in window.histograms.plot.getPlotItem().titleLabel.text


def test_histogram_titles_fit_at_1366x768_without_gradients(qtbot, window, resnet50_file):
    """No data (the "no gradients" panel beside the weights plot): the weights plot's title
    for a long layer name fits the plot instead of being clipped and pushing the plot item
    (and its right axis) past the view; the gradients title fits once there are gradients."""
    open_ready(qtbot, window, resnet50_file)
    h = window.histograms
    name = "layer3.0.downsample.0"
    window.controller.set_selection((name,))
    window.layout().activate()
    qtbot.wait(20)
    assert h.grad_stack.currentWidget() is h.grad_hint and h.grad_hint.isVisible()

    def title_fits(plot) -> bool:
        return plot.getPlotItem().titleLabel.item.boundingRect().width() <= plot.width()

    def fits(plot) -> bool:
        item = plot.getPlotItem()
        return title_fits(plot) and item.geometry().width() <= plot.viewport().width() + 1

    assert fits(h.plot), (h.plot.width(), h.plot.getPlotItem().titleLabel.text)
    assert name in h.plot.getPlotItem().titleLabel.text  # the name, shortened only if need be
    # narrower still (the splitter dragged): the title follows the width (the axes may
    # then need more than the plot has; the title does not add to it)
    h.splitter.setSizes([140, 400])
    qtbot.wait(20)
    text = h.plot.getPlotItem().titleLabel.text
    assert title_fits(h.plot) and "original" not in text and "…" in text, text
    assert fits(h.grad_plot) or not h.grad_plot.isVisible()


def test_kept_text_is_not_cut(qtbot, window, resnet50_file):
    open_ready(qtbot, window, resnet50_file)
    label = window.summary.labels["nonzeros"]
    label.setText("25.50 M / 25.50 M")
    window.layout().activate()
    qtbot.wait(20)
    assert label.width() >= label.fontMetrics().horizontalAdvance(label.text())


def test_with_no_plan_after_equals_before(qtbot, window, resnet50_file):
    open_ready(qtbot, window, resnet50_file)
    c = window.controller
    assert c.plan == starting_plan()
    texts = window.summary.texts()
    assert c.preview.packed_bytes <= c.baseline_bytes
    assert texts["packed"] == texts["dense"] and texts["ratio"] == "1.0×"
    assert texts == summary_texts(c.preview, c.baseline_bytes)
    c.set_plan(simple_plan(0.5, 8, "magnitude"))
    assert c.preview.packed_bytes < c.baseline_bytes


def test_stale_banner_does_not_shift_the_layout(qtbot, window):
    open_ready(qtbot, window, "demo:mlp")
    c = window.controller
    c.set_plan(simple_plan(0.5, 6, "magnitude"))
    c.compress()
    # the evaluation that follows a compress fills the results panel too: wait for it
    qtbot.waitUntil(
        lambda: c.result is not None and c.evaluation is not None and not c.busy(),
        timeout=TIMEOUT,
    )
    qtbot.wait(50)
    table = window.results.table
    before = table.mapTo(window, table.rect().topLeft())
    assert window.results.stale.isHidden()
    c.set_plan(simple_plan(0.6, 6, "magnitude"))
    qtbot.wait(20)
    assert not window.results.stale.isHidden()
    assert table.mapTo(window, table.rect().topLeft()) == before


# ---------------------------------------------------------------------- layout
def test_size_chart_shows_top_n_and_others_on_107_layers(qtbot, window, resnet50_file):
    open_ready(qtbot, window, resnet50_file)
    names = window.size_view._names
    selected = window.controller.selection
    # The largest TOP_N, the selected layer (the first conv), one bar for the rest.
    assert len([n for n in names[:-1] if n not in selected]) == TOP_N
    total = len(window.controller.preview.layers)
    assert names[-1] == f"{OTHERS} ({total - len(names) + 1} layers)"
    small = "layer1.0.conv1"  # a 1x1 conv, far from the largest
    assert small not in names
    window.controller.set_selection((small,))
    assert small in window.size_view._names


def test_every_control_group_reachable_without_scrolling_at_1366x768(qtbot, window, resnet50_file):
    open_ready(qtbot, window, resnet50_file)
    tabs = window.control_tabs
    assert [tabs.tabText(i) for i in range(tabs.count())] == [
        "Pruning",
        "Quantization",
        "Recovery",
        "Target",
    ]
    viewport = window.controls_scroll.viewport()
    for i in range(tabs.count()):
        tabs.setCurrentIndex(i)
        qtbot.wait(10)
        page = tabs.currentWidget()
        bottom = page.mapTo(viewport, page.rect().bottomLeft()).y()
        assert bottom <= viewport.height(), tabs.tabText(i)


# ---------------------------------------------------------------------- runs and Pareto
def test_pareto_front_and_damage():
    pts = [(10.0, 5.0), (20.0, 1.0), (15.0, 6.0), (5.0, 9.0), (20.0, 0.5)]
    assert pareto_front(pts) == [3, 0, 4]
    rec = RunRecord(1, "evaluate", CompressionPlan(), 1.0, accuracy_before=0.9, accuracy_after=0.8)
    assert damage(rec) == (pytest.approx(10.0), "accuracy lost (pp)")
    assert damage(RunRecord(2, "compress", CompressionPlan(), 1.0)) is None


def test_compare_plans_lists_only_differing_layers():
    a = simple_plan(0.5, 8, "magnitude")
    b = a.with_layer("fc2", simple_plan(0.9, 4, "magnitude").default)
    rows = compare_plans(a, b, ["fc1", "fc2", "fc3"])
    assert [r[0] for r in rows] == ["fc2"]
    assert "50.0 %" in rows[0][1] and "90.0 %" in rows[0][2] and "4-bit" in rows[0][2]
    assert compare_plans(a, a, ["fc1", "fc2"]) == []


def test_runs_recorded_restored_compared_and_saved(qtbot, tmp_path):
    settings = QSettings(str(tmp_path / "runs.ini"), QSettings.Format.IniFormat)
    w = make_window(qtbot, settings)
    try:
        open_ready(qtbot, w, "demo:mlp")
        c, view = w.controller, w.runs_view
        plans = [simple_plan(0.5, 8, "magnitude"), simple_plan(0.95, 2, "magnitude")]
        for plan in plans:
            c.set_plan(plan)
            with qtbot.waitSignal(c.evaluated, timeout=TIMEOUT, check_params_cb=bool):
                c.compress()
            wait_idle(qtbot, w)
        # compress + evaluate for each plan, in the session and in the table
        assert [r.kind for r in c.runs] == ["compress", "evaluate", "compress", "evaluate"]
        assert view.table.rowCount() == 4
        xs, ys = view.points.getData()
        assert len(xs) == 2  # the evaluated runs are the measured points
        assert view.front_ids()  # a front is drawn
        assert len(view.front.getData()[0]) == len(view.front_ids())
        # Click the first evaluated run's point: its plan comes back.
        first_eval = next(i for i, r in enumerate(c.runs) if r.kind == "evaluate")
        assert c.plan != c.runs[first_eval].plan
        view.click_point(first_eval)
        assert c.plan == c.runs[first_eval].plan
        # Select two runs and compare them per layer.
        view.table.clearSelection()
        view.table.setSelectionMode(view.table.SelectionMode.MultiSelection)
        view.table.selectRow(0)
        view.table.selectRow(2)
        assert view.compare.isEnabled() and not view.restore.isEnabled()
        dialog = view.compare_selected()
        assert isinstance(dialog, CompareDialog)
        names = [dialog.table.item(r, 0).text() for r in range(dialog.table.rowCount())]
        assert names and set(names) <= {layer.name for layer in c.layers}
        dialog.close()
        w.save_session()
        saved = json.loads(settings.value("session/runs"))
        assert saved["model"] == "demo:mlp" and len(saved["runs"]) == 4
    finally:
        w.close()
    # A new window on the same settings: the runs come back with the model.
    w2 = make_window(qtbot, settings)
    try:
        open_ready(qtbot, w2, "demo:mlp")
        assert [r.kind for r in w2.controller.runs] == [
            "compress",
            "evaluate",
            "compress",
            "evaluate",
        ]
        assert w2.runs_view.table.rowCount() == 4
        assert w2.controller.runs[1].plan == plans[0]
    finally:
        w2.controller.shutdown()


def test_layer_tree_groups_by_module_path_filters_and_selects(qtbot, window, resnet50_file):
    open_ready(qtbot, window, resnet50_file)
    lt, c = window.layer_table, window.controller
    lt.grouped.setChecked(True)
    assert lt.views.currentWidget() is lt.tree
    tree = lt.tree_model
    top = [tree.index(r, 0).data() for r in range(tree.rowCount())]
    assert top[:2] == ["conv1", "bn1"] and any(t.startswith("layer3  (") for t in top)
    layer3 = tree.index(next(i for i, t in enumerate(top) if t.startswith("layer3")), 0)
    blocks = [tree.index(r, 0, layer3).data() for r in range(tree.rowCount(layer3))]
    assert [b.split()[0] for b in blocks] == ["0", "1", "2", "3", "4", "5"]
    # Leaves: the short name shown, the full one on hover and in the details line.
    leaf = tree.index_of("layer3.4.conv2")
    assert leaf.data() == "conv2" and "layer3.4.conv2" in leaf.data(0x0003)  # ToolTipRole
    lt.tree.selectionModel().select(
        leaf,
        lt.tree.selectionModel().SelectionFlag.ClearAndSelect
        | lt.tree.selectionModel().SelectionFlag.Rows,
    )
    assert c.selection == ("layer3.4.conv2",)
    assert lt.details.text().startswith("layer3.4.conv2 · Conv2d")
    # Folding a block hides its layers.
    lt.tree.collapse(layer3)
    assert not lt.tree.isExpanded(layer3)
    # Prunable only: the 53 BatchNorm rows go, in the table and in the tree.
    lt.prunable_only.setChecked(True)
    assert lt.proxy.rowCount() == 54
    assert len(tree.leaf_names()) == 54 and "bn1" not in tree.leaf_names()
    lt.filter_edit.setText("layer4")
    assert tree.leaf_names() and all(n.startswith("layer4") for n in tree.leaf_names())
    # Selecting from the window (e.g. the size chart) shows in the tree too.
    c.set_selection(("layer4.1.conv3",))
    rows = lt.tree.selectionModel().selectedRows()
    assert [i.data(NAME_ROLE) for i in rows] == ["layer4.1.conv3"]


def test_big_nested_model_opens_grouped_and_size_labels_do_not_overlap(
    qtbot, window, resnet50_file
):
    """107 layers in nested modules: the layer list opens as a module tree (flat names would be
    elided in the dock) unless the user chose otherwise; the size chart names at most one bar
    per LABEL_PX pixels of its height, the "others" bar always."""
    from app.widgets.size_view import LABEL_PX

    window.resize(1366, 768)
    open_ready(qtbot, window, resnet50_file)
    table = window.layer_table
    assert table.grouped.isChecked()
    assert table.views.currentWidget() is table.tree
    view = window.size_view
    ticks = view._ticks
    height = view.plot.getViewBox().height()
    assert len(ticks) <= max(2, height // LABEL_PX)
    assert ticks[-1][1] == view._names[-1]
    table.grouped.click()  # the user's choice sticks for the next model
    assert not table.grouped.isChecked()
    open_ready(qtbot, window, "demo:mlp")
    assert not table.grouped.isChecked()


class _LongNames(nn.Module):
    """Eight layers whose names (``encoder.block.0.attention.query``) the dock would elide to
    the same few characters in every row."""

    def __init__(self):
        super().__init__()
        blocks = []
        for _ in range(2):
            block = nn.Module()
            block.attention = nn.ModuleDict({"query": nn.Linear(8, 8), "value": nn.Linear(8, 8)})
            block.feed_forward = nn.ModuleDict({"up": nn.Linear(8, 8), "down": nn.Linear(8, 8)})
            blocks.append(block)
        self.encoder = nn.Module()
        self.encoder.block = nn.ModuleList(blocks)

    def forward(self, x):
        for b in self.encoder.block:
            x = b.attention["value"](b.attention["query"](x))
            x = b.feed_forward["down"](torch.relu(b.feed_forward["up"](x)))
        return x


def test_a_small_model_with_long_nested_names_opens_grouped(qtbot, window, tmp_path):
    """Fewer layers than AUTO_GROUP, but names longer than NAME_FIT: the module tree, where
    each row shows its short name; a model with short names stays a flat table."""
    from app.widgets.layer_table import AUTO_GROUP, NAME_FIT

    path = tmp_path / "long.pt2"
    torch.export.save(torch.export.export(_LongNames().eval(), (torch.randn(2, 8),)), str(path))
    open_ready(qtbot, window, str(path))
    names = [layer.name for layer in window.controller.layers]
    assert len(names) < AUTO_GROUP and max(map(len, names)) > NAME_FIT
    table = window.layer_table
    assert table.grouped.isChecked() and table.views.currentWidget() is table.tree
    open_ready(qtbot, window, "demo:cnn")
    assert not table.grouped.isChecked()


def test_a_language_model_on_text_shows_gradients_and_perplexity(qtbot, window, tmp_path):
    """A causal LM folder with unlabelled text: the analysis has gradient statistics (the
    next-token loss) and the results table shows perplexity and next-token agreement in
    place of accuracy and agreement; a classifier afterwards gets its own rows back."""
    pytest.importorskip("transformers")
    from tests import hf_models

    folder = tmp_path / "gpt2"
    hf_models.build_folder("causal_lm", folder)
    text = hf_models.write_txt(tmp_path / "text.txt", 40)
    c = window.controller
    open_ready(qtbot, window, folder)
    c.open_data(str(text))
    qtbot.waitUntil(
        lambda: c.train is not None and c.stats is not None and not c.busy(), timeout=TIMEOUT
    )
    qtbot.waitUntil(
        lambda: all(ts.grad is not None for ts in c.stats.tensors.values()), timeout=TIMEOUT
    )
    c.set_plan(simple_plan(0.5, 8, "taylor"))
    with qtbot.waitSignal(c.evaluated, timeout=TIMEOUT, check_params_cb=bool):
        c.compress()
    wait_idle(qtbot, window)
    table = window.results.table
    headers = [table.verticalHeaderItem(r).text() for r in range(table.rowCount())]
    assert headers[:2] == ["Perplexity", "Next-token agr."]
    after = c.evaluation.after
    assert table.item(0, 1).text() == format(after.perplexity, ".3f")
    assert table.item(1, 1).text().endswith("%")
    open_ready(qtbot, window, "demo:mlp")
    with qtbot.waitSignal(c.evaluated, timeout=TIMEOUT, check_params_cb=bool):
        c.compress()
    wait_idle(qtbot, window)
    assert table.verticalHeaderItem(0).text() == "Accuracy"
