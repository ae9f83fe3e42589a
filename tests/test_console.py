"""dsft owns the console: the first command's output without a terminal, run.log, curves.png, the run's
model card, trackers, tables that never cut a value, the plan's memory line, heatmaps marking experts."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import REPO


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """README's first command, `dsft sft --recipe recipes/tiny-legal.yaml`, run as is (output_dir moved),
    without a terminal; (run dir, everything it printed)."""
    import os

    from typer.testing import CliRunner

    from dsft.cli.app import app

    run = tmp_path_factory.mktemp("demo") / "tiny-legal"
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        result = CliRunner().invoke(app, ["sft", "--recipe", "recipes/tiny-legal.yaml", "--set", f"output_dir={run}"])
    finally:
        os.chdir(cwd)
    assert result.exit_code == 0, result.output
    return run, result.output


def test_the_first_command_prints_plain_lines_and_logs_everything(demo) -> None:
    run, printed = demo
    log = (run / "run.log").read_text()
    for text in (printed, log):
        assert "\r" not in text
        assert not re.search(r"^\s*\{['\"]", text, re.M), "a raw dict line"  # TRL's PrinterCallback / tqdm.write
        assert "it/s]" not in text and "examples/s]" not in text  # no tqdm / datasets bars
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in logged if "loss" in r]
    # one plain line per logged step, with loss and lr, then the phase's last line
    assert [int(m) for m in re.findall(r"^step (\d+)/60  loss", printed, re.M)] == steps
    assert re.search(r"^sft training: 60/60 steps  loss [\d.]+  lr ", printed, re.M)
    assert "dsft targeting plan" in log and "step 10/60  loss" in log and "dsft sft:" in log
    assert f"adapter: {run / 'adapter'}" in printed.replace("\n", "")  # the path to copy, whole


def test_the_demo_learns_and_beats_the_base_on_held_out_data(demo) -> None:
    run, printed = demo
    summary = json.loads((run / "run.json").read_text())["summary"]
    assert summary["last_loss"] < summary["first_loss"] - 1.0
    assert summary["eval_loss"] < summary["base_eval_loss"] - 1.0  # held-out: the adapter beats the base
    assert re.search(r"held-out loss \(data\.eval\).*base [\d.]+ -> [\d.]+", printed)
    assert printed.count("held-out loss") == 1  # once, in the final table (run.log has the evaluation's line too)
    assert "base model's held-out loss" in (run / "run.log").read_text()


def test_curves_png_draws_metrics_jsonl(demo) -> None:
    from dsft.runs.metrics import read_metrics
    from dsft.train.curves import build_figure
    from dsft.train.objective import objective

    run, _ = demo
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = read_metrics(run / "metrics.jsonl")[0]
    fig = build_figure(rows, objective("sft").panels)
    axes = {ax.get_title(): ax for ax in fig.axes}
    assert list(axes) == ["loss", "learning rate"]
    lines = {line.get_label(): line for line in axes["loss"].get_lines()}
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    held_out = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    assert list(zip(*lines["train"].get_data())) == train
    assert list(zip(*lines["eval"].get_data())) == held_out and held_out
    lr = axes["learning rate"].get_lines()[0]
    assert list(lr.get_ydata()) == [r["learning_rate"] for r in rows if "learning_rate" in r]


def test_curves_read_honestly(tmp_path: Path) -> None:
    """Five panels in rows of three (not a 5-wide strip); whole steps on the x axis; a loss between 15.8 and 16.0
    drawn on a range of at least 5% of its size, not filling the panel; the loss axis in the objective's unit."""
    from matplotlib.ticker import MaxNLocator

    from dsft.train.curves import build_figure
    from dsft.train.objective import objective

    rows = [{"step": s, "loss": 15.8 + 0.05 * s, "learning_rate": 1e-3 * s, "rewards/accuracies": 0.5 + 0.1 * s,
             "rewards/margins": 0.1 * s, "grad_norm": s, "extra": s * s} for s in range(1, 5)]
    panels = {**objective("dpo").panels, "grad norm": (("train", "grad_norm"),), "other": (("train", "extra"),)}
    fig = build_figure(rows, panels, "dsft dpo: run", {"loss": objective("dpo").loss_unit})
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == 6 and fig.get_size_inches()[0] < 15 and fig.get_size_inches()[1] > 6  # 2 rows of 3
    loss = next(ax for ax in visible if ax.get_title() == "loss")
    low, high = loss.get_ylim()
    assert high - low >= 0.05 * 16.0 - 1e-9
    assert loss.get_ylabel() == "DPO loss per pair (sigmoid: -log sigmoid(beta x margin))"
    assert all(isinstance(ax.xaxis.get_major_locator(), MaxNLocator) for ax in visible)
    assert all(float(t).is_integer() for ax in visible for t in ax.get_xticks())


def test_dpo_curves_have_reward_panels() -> None:
    from dsft.train.curves import build_figure
    from dsft.train.objective import objective

    rows = [{"step": s, "loss": 0.7 - s / 100, "learning_rate": 1e-3, "rewards/accuracies": s / 10,
             "rewards/margins": s / 5} for s in (1, 5, 10)] + [{"step": 10, "eval_loss": 0.6,
                                                                "eval_rewards/accuracies": 0.8, "eval_rewards/margins": 1.5}]
    fig = build_figure(rows, objective("dpo").panels)
    axes = {ax.get_title(): ax for ax in fig.axes}
    # a constant learning rate is said in the title, not drawn as a flat panel
    assert list(axes) == ["loss", "reward accuracy", "reward margin (chosen - rejected)"]
    assert "learning rate constant at 0.001" in fig._suptitle.get_text()
    assert [ax.get_ylabel() for ax in fig.axes] == ["loss (nats per token)", "share of pairs", "beta x log-ratio (nats)"]
    acc = {line.get_label(): list(line.get_ydata()) for line in axes["reward accuracy"].get_lines()}
    assert acc == {"train": [0.1, 0.5, 1.0], "eval": [0.8]}
    margin = {line.get_label(): list(line.get_xdata()) for line in axes["reward margin (chosen - rejected)"].get_lines()}
    assert margin == {"train": [1, 5, 10], "eval": [10]}


def test_the_run_dir_readme_is_dsfts_model_card(demo) -> None:
    run, _ = demo
    card = (run / "README.md").read_text()
    info = json.loads((run / "run.json").read_text())
    assert info["base_model"]["config_sha256"] in card and "builtin:tiny-deepseek-v3" in card
    for path, sha in info["data_sha256"].items():
        assert f"`{path}` sha256 `{sha}`" in card
    summary = info["summary"]
    assert f"{summary['eval_loss']:.4g}" in card and f"{summary['base_eval_loss']:.4g}" in card
    plan = json.loads((run / "plan.json").read_text())
    for layer, experts in plan["groups"]["routed_experts"]["experts"].items():
        assert f"- layer {layer}: experts {', '.join(map(str, experts))}" in card
    assert f"dsft merge  --adapter {run}" in card and "r=16 alpha=32" in card
    assert (run / "adapter/README.md").read_text() == card  # PEFT's boilerplate is not written
    assert not list((run / "checkpoints").rglob("README.md"))  # neither is TRL's
    assert "More Information Needed" not in card and "huggingface.co/None" not in card


def test_report_to_tensorboard_writes_event_files(make_recipe, cli) -> None:
    recipe = make_recipe(training={"max_steps": 2, "logging_steps": 1, "report_to": ["tensorboard"]})
    result = cli("sft", "--recipe", recipe)
    assert result.exit_code == 0, result.output
    run = recipe.parent / "run"
    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = EventAccumulator(str(events[0].parent)).Reload().Tags()["scalars"]
    assert "train/loss" in scalars
    # the run's own tensorboard/ is dsft's: --force replaces the run (a wandb/ it never wrote would stop it)
    again = cli("sft", "--recipe", recipe, "--force")
    assert again.exit_code == 0, again.output


def test_a_tracker_that_is_not_installed_is_one_line(make_recipe, cli, monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("wandb", "mlflow") else real(name, *a))
    recipe = make_recipe(training={"report_to": ["wandb", "mlflow"]})
    result = cli("sft", "--recipe", recipe)
    assert result.exit_code == 2
    assert "error: training.report_to: wandb is not installed; pip install wandb" in result.output
    assert "mlflow is not installed" in result.output and "Traceback" not in result.output
    assert not (recipe.parent / "run").exists()


def test_tables_never_cut_a_value(monkeypatch) -> None:
    """On a terminal too narrow for a table: records, every value whole."""
    import io

    from rich.console import Console
    from rich.table import Table

    from dsft import console as dsft_console

    buffer = io.StringIO()
    monkeypatch.setattr(dsft_console, "console", lambda *a, **k: Console(file=buffer, force_terminal=True, width=60,
                                                                          soft_wrap=True, color_system=None))
    path = "/tmp/some/long/place/runs/my-alpaca-with-a-long-name/adapter" * 2
    table = Table(title="dsft sft: a title long enough that rich would wrap it across lines")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("loss first -> last", "7.237 -> 4.786")
    table.add_row("adapter", path)
    dsft_console.show(table)
    out = buffer.getvalue()
    assert path in out.splitlines()[-1]  # whole, on a line of its own
    assert "loss first -> last: 7.237 -> 4.786" in out
    assert "dsft sft: a title long enough that rich would wrap it across lines" in out
    narrow = Table(title="t")
    narrow.add_column("a")
    narrow.add_row("b")
    buffer.truncate(0)
    dsft_console.show(narrow)
    assert "┃ a ┃" in buffer.getvalue()  # a table that fits stays a table


def _summary_table():
    """A GRPO run's summary table as `dsft grpo` prints it (dsft.cli._common.training_command)."""
    from rich.table import Table

    table = Table(title="dsft grpo: runs/tiny-grpo")
    for i, column in enumerate(("what", "first 5 logged steps", "last 5 logged steps")):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in (("reward", "-1.712", "-1.485"), ("completion length (tokens)", "15.9", "15.9"),
                ("time generating (generated tokens/s)", "", "49.6% (1,917)"),
                ("reference", "", "none (beta 0: no KL term)"), ("trainable params: attention", "", "15,552"),
                ("trainable params: routed_experts", "", "5,376")):
        table.add_row(*row)
    return table


@pytest.mark.parametrize("columns", ["60", "80", "250"])
def test_tables_without_a_terminal_are_the_same_text_for_every_run(monkeypatch, capsys, columns: str) -> None:
    """nohup / SLURM / tee: the summary table printed whole, as run.log holds it, whatever COLUMNS says; the
    text is a golden file (tests/data/summary-nohup.txt), not key / value fragments."""
    from dsft.console import show

    monkeypatch.setenv("COLUMNS", columns)
    show(_summary_table())
    out = capsys.readouterr().out
    assert out == (REPO / "tests/data/summary-nohup.txt").read_text(encoding="utf-8")
    assert "│ trainable params: attention          │" in out and "15,552 │" in out


def test_the_plan_reports_host_memory_on_cpu() -> None:
    from dsft.adapters.plan import build_plan, plan_table
    from dsft.config import load_recipe
    from dsft.console import _plain
    from dsft.models.builtin import CONFIGS

    recipe = load_recipe(REPO / "recipes/tiny-legal.yaml")
    plan = build_plan(recipe, CONFIGS["tiny-deepseek-v3"], {1: [0], 2: [1]})
    cpu, gpu = _plain(plan_table(plan, cuda=False)), _plain(plan_table(plan, cuda=True))
    assert "peak host memory (CPU run)" in cpu and "GPU" not in cpu
    assert "peak GPU memory" in gpu
    assert f"~{plan['memory']['host_gib']:.1f} GiB" in cpu and f"~{plan['memory']['peak_gib']:.1f} GiB" in gpu
    assert plan["memory"]["peak_gib"] - plan["memory"]["host_gib"] == pytest.approx(0.4)  # CUDA context vs process


def test_heatmaps_box_the_selected_experts(tmp_path: Path) -> None:
    from dsft.moe.profile import heatmap

    layers = {str(layer): {"token_share": [0.5, 0.2, 0.2, 0.1]} for layer in (1, 2)}
    profile = {"layers": layers, "top_k": 2, "tokens_counted": 10}
    boxed = heatmap(profile, tmp_path / "h.png", "routing profile", selected={1: [0, 2], 2: None})
    assert sorted(boxed) == [(1, 0), (1, 2), (2, 0), (2, 1), (2, 2), (2, 3)]
    assert heatmap(profile, tmp_path / "h.png", "routing profile") == []
    assert (tmp_path / "h.png").stat().st_size > 0


def test_the_policy_redraws_the_profile_heatmap_with_its_experts(monkeypatch, tmp_path: Path) -> None:
    from dsft.config import load_recipe
    from dsft.moe import profile as routing_profile
    from dsft.train.targeting import policy_selection

    drawn = {}
    monkeypatch.setattr(routing_profile, "heatmap", lambda profile, path, title, selected=None: drawn.update(
        path=path, selected=selected))
    layers = {str(layer): {"token_share": [0.6, 0.3, 0.05, 0.05], "gate_sum": [6.0, 3.0, 0.5, 0.5],
                           "gate_mean": [0.6, 0.3, 0.05, 0.05], "counts": [6, 3, 1, 1]} for layer in (1, 2)}
    selection = policy_selection(load_recipe(REPO / "recipes/tiny-legal.yaml"), {"layers": layers, "top_k": 2},
                                 tmp_path)
    assert drawn == {"path": tmp_path / "heatmap.png", "selected": selection} and selection[1] == [0]


def test_the_readme_lists_what_a_run_dir_holds(demo) -> None:
    run, _ = demo
    line = next(x for x in (REPO / "README.md").read_text().splitlines() if "ls runs/tiny-legal" in x)
    listed = line.split("#", 1)[1].split()
    written = sorted(p.name + ("/" if p.is_dir() else "") for p in run.iterdir() if not p.name.startswith("."))
    assert sorted(listed) == written


def test_a_phase_without_a_terminal_prints_plain_lines(monkeypatch, capsys) -> None:
    import dsft.console as console

    monkeypatch.setattr(console, "PLAIN_EVERY_S", 0.0)
    assert list(console.track(range(3), "tokenizing data.train", unit="rows")) == [0, 1, 2]
    out = capsys.readouterr().out
    assert "\r" not in out and "\x1b" not in out
    assert out.splitlines()[-1].startswith("tokenizing data.train: 3/3 rows  (0:00)")
    assert "tokenizing data.train: 1/3 rows" in out  # a line as it goes (here: every advance)


def _card_commands(card: str) -> list[list[str]]:
    import shlex

    block = card.split("## Next", 1)[1].split("```", 2)[1]
    return [shlex.split(line, comments=True) for line in block.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def _run_card(run: Path, cli) -> list[list[str]]:
    commands = _card_commands((run / "README.md").read_text())
    for argv in commands:
        assert argv[0] == "dsft"
        outputs = [Path(argv[i + 1]) for i, a in enumerate(argv) if a == "--out"]
        assert all(not p.exists() for p in outputs), f"{argv}: names an output that exists"
        result = cli(*argv[1:])
        assert result.exit_code == 0, f"{' '.join(argv)}\n{result.output}"
        assert all(p.is_dir() for p in outputs)
    return commands


def test_the_cards_next_commands_run_as_written(demo, cli, tmp_path: Path) -> None:
    """SFT demo (data.eval set) and a DPO run continuing it (no data.eval: eval says --on-train); a second
    card written while a merge exists names another output."""
    import os

    run, _ = demo
    commands = _run_card(run, cli)
    assert [c[1] for c in commands] == ["eval", "chat", "merge", "export", "export"]
    assert {c[c.index("--format") + 1] for c in commands if c[1] == "export"} == {"peft", "vllm"}
    card = (run / "README.md").read_text()
    assert f'PeftModel.from_pretrained(base, "{run.parent / (run.name + "-peft")}")' in card
    dpo = tmp_path / "dpo"
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        result = cli("dpo", "--recipe", "recipes/tiny-legal-dpo.yaml", "--set", f"dpo.init_adapter={run}",
                     "--set", f"output_dir={dpo}", "--set", "training.max_steps=2")
    finally:
        os.chdir(cwd)
    assert result.exit_code == 0, result.output
    (tmp_path / "dpo-merged").mkdir()  # already taken: the card names the next free name
    (tmp_path / "dpo-merged" / "mine.txt").write_text("x")
    card = (dpo / "README.md").read_text()
    commands = _card_commands(card)
    assert "--on-train" in commands[0]
    # the card was written before dpo-merged/ existed; write it again now that it does
    _rewrite_card(dpo)
    commands = _run_card(dpo, cli)
    merge = next(c for c in commands if c[1] == "merge")
    assert merge[merge.index("--out") + 1] == str(tmp_path / "dpo-merged-2")
    assert (tmp_path / "dpo-merged" / "mine.txt").read_text() == "x"


def _rewrite_card(run: Path) -> None:
    import json as _json

    from dsft.config.load import load_run_recipe
    from dsft.train.card import write_card

    info = _json.loads((run / "run.json").read_text())
    plan = _json.loads((run / "plan.json").read_text()) if (run / "plan.json").exists() else None
    write_card(run, "dpo", load_run_recipe(run), info, info["summary"], plan)


def _outside(fig) -> list[str]:
    """What is drawn outside the figure: the drawn artists' tight box (titles, labels, tick labels, the
    colour bar's label; undrawn ticks do not count) against the figure's edges, in inches."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    tight = fig.get_tightbbox(canvas.get_renderer())
    width, height = fig.get_size_inches()
    eps = 0.02
    return [f"{side} {value:.2f}" for side, value, ok in (
        ("left", tight.x0, tight.x0 >= -eps), ("bottom", tight.y0, tight.y0 >= -eps),
        ("right", tight.x1, tight.x1 <= width + eps), ("top", tight.y1, tight.y1 <= height + eps)) if not ok]


@pytest.mark.parametrize("experts,layers", [(8, 2), (64, 26), (256, 58)])
def test_no_title_or_label_leaves_the_figure(tmp_path: Path, monkeypatch, experts: int, layers: int) -> None:
    """Every figure dsft writes, at the sizes it writes them (the tiny model's 8 experts x 2 layers to
    DeepSeek-V3's 256 x 58): heatmaps with their long titles and the diff's colour bar, curves.png, eval.png."""
    from matplotlib.figure import Figure

    from dsft.moe import profile as routing_profile
    from dsft.train.curves import build_figure
    from dsft.evaluate import eval_figure
    from dsft.train.objective import objective

    drawn = []
    original = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (drawn.append(self), original(self, *a, **k))[1])

    def profile(shift: float) -> dict:
        share = [[(e + shift * layer) % experts / experts for e in range(experts)] for layer in range(layers)]
        return {"top_k": 6, "tokens_counted": 12345, "layers": {str(layer + 1): {"token_share": row}
                                                                 for layer, row in enumerate(share)}}

    selected = {1: [0, 3], 2: list(range(min(experts, 20)))}
    routing_profile.heatmap(profile(0), tmp_path / "a.png", "routing profile", selected=selected, vmax=1.0)
    routing_profile.heatmap(profile(1), tmp_path / "b.png", "routing change after training", diff_from=profile(0),
                            selected=selected)
    rows = [{"step": s, "loss": 1 / s, "learning_rate": 1e-3 * s, "rewards/accuracies": 0.5, "rewards/margins": s}
            for s in range(1, 6)]
    drawn.append(build_figure(rows, objective("dpo").panels, "dsft dpo: a-run-with-a-rather-long-name-for-its-directory"))
    report = {"examples": 3, "data_kind": "held-out", "data_source": "data.eval", "run": "runs/legal",
              "base": {"example_loss": [1, 2, 3], "pairs": {"margins": [1, -1, 2]}},
              "adapter": {"example_loss": [0.5, 1, 2], "pairs": {"margins": [2, 0, 3]}}}
    drawn.append(eval_figure(report))
    assert len(drawn) == 4
    for fig in drawn:
        assert _outside(fig) == []


def test_before_and_after_heatmaps_share_one_scale(tmp_path: Path, monkeypatch) -> None:
    from dsft.moe import profile as routing_profile

    before = {"top_k": 2, "layers": {"1": {"token_share": [0.4, 0.1]}}}
    after = {"top_k": 2, "layers": {"1": {"token_share": [0.3, 0.2]}}}
    assert routing_profile.share_max(before, after) == pytest.approx(0.4)


@pytest.mark.parametrize("main", [True, False])
def test_torchs_own_log_lines_stay_off_the_console_during_a_run(main: bool, tmp_path: Path,
                                                               capfd: pytest.CaptureFixture) -> None:
    """torch's loggers write to stderr through a handler of their own (torch._logging), which a run's log must take
    over: a warning of torch.distributed's (DTensor's redistribution note, which every rank printed under
    training.parallel) lands in run.log on the main process, nowhere on the others, and never on the console; after
    the run torch's handler is back."""
    import logging

    import torch.distributed.tensor  # noqa: F401 - torch's log handlers set up

    from dsft.console import run_log

    torch_logger = logging.getLogger("torch")
    before = list(torch_logger.handlers)
    log = tmp_path / "run.log"
    with run_log(log if main else None):
        logging.getLogger("torch.distributed.tensor._redistribute").warning("While redistributing from A to B")
    assert "redistributing" not in capfd.readouterr().err
    assert ("While redistributing from A to B" in log.read_text()) if main else not log.exists()
    assert torch_logger.handlers == before
