"""What a new user meets first: `validate --recipe` like every command, Ctrl-C belonging to the caller
outside the `dsft` entry point."""

from __future__ import annotations

import signal

from conftest import REPO


def test_validate_takes_recipe_as_an_option_too(cli) -> None:
    recipe = REPO / "recipes/tiny-legal.yaml"
    for args in (["validate", recipe], ["validate", "--recipe", recipe], ["validate", "-r", recipe]):
        result = cli(*args)
        assert result.exit_code == 0 and "tiny-legal.yaml: ok" in result.output, result.output
    both = cli("validate", recipe, "--recipe", recipe)
    assert both.exit_code == 2 and "give the recipe once" in both.output


def test_signal_handlers_are_the_entry_points_only(monkeypatch) -> None:
    """In-process (pytest, a notebook) dsft leaves SIGINT alone; `dsft` itself installs its clean stop."""
    from dsft.train.resume import SIGNALS_ENV, GracefulStop

    before = signal.getsignal(signal.SIGINT)
    monkeypatch.delenv(SIGNALS_ENV, raising=False)
    stop = GracefulStop()
    stop.on_train_begin(None, None, None)
    assert signal.getsignal(signal.SIGINT) is before
    monkeypatch.setenv(SIGNALS_ENV, "1")
    stop.on_train_begin(None, None, None)
    assert signal.getsignal(signal.SIGINT) == stop._handle
    stop.on_train_end(None, None, None)
    assert signal.getsignal(signal.SIGINT) is before
