"""The `peflow` command: one subcommand per registered stage, generated from
the stage's config dataclass, plus the orchestration helpers."""

from __future__ import annotations

import dataclasses
import inspect
import sys
from typing import Any

import typer

from peflow import stages
from peflow.config import base_type, field_help, resolved_fields

app = typer.Typer(
    name="peflow",
    help="Train, align and evaluate Perception Encoder (PE) vision encoders.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _stage_command(stage: stages.Stage) -> Any:
    """A typer callback whose options are the fields of the stage's Config."""
    cls = stage.config_cls
    params = []
    for f, tp in resolved_fields(cls):
        typ = base_type(tp)
        if typ not in (int, float, str, bool):
            raise TypeError(f"{cls.__name__}.{f.name}: unsupported CLI type {tp}")
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = ... if required else f.default
        flag = "--" + f.name.replace("_", "-")
        decls = [f"{flag}/--no-{f.name.replace('_', '-')}"] if typ is bool else [flag]
        params.append(
            inspect.Parameter(
                f.name,
                inspect.Parameter.KEYWORD_ONLY,
                default=typer.Option(default, *decls, help=field_help(f), show_default=not required),
                annotation=typ if required or f.default is not None else typ | None,
            )
        )

    def command(**kwargs: Any) -> None:
        try:
            cfg = cls(**kwargs)
            stage.run(cfg)
        except ValueError as e:
            typer.secho(f"peflow {stage.name}: {e}", fg="red", err=True)
            raise typer.Exit(2) from None

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__doc__ = (stage.load().__doc__ or stage.summary).strip()
    return command


for _stage in stages.STAGES:
    app.command(name=_stage.name, help=_stage.summary)(_stage_command(_stage))


def main(argv: list[str] | None = None) -> None:
    """Entry point; `argv` lets tests and launchers call it in-process."""
    app(args=argv if argv is not None else sys.argv[1:], prog_name="peflow")


if __name__ == "__main__":
    main()
