"""The ``mas`` command's entry point, kept light on purpose.

``mas agent run`` and ``mas agent probe`` are what every agent process and container
runs: they load only the agent commands and the runtime. Every other command loads the
whole CLI, whose imports (the dashboard's web stack, the deployment generator, the
operator tools) cost an idle agent about 9 MiB of private memory it never uses.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

import structlog
import typer
from pydantic import ValidationError

from broker.errors import BrokerError
from security.errors import SecurityError

AGENT_PROCESS_COMMANDS = ("run", "probe")


def configure_logging() -> None:
    """JSON lines on stderr (pretty on a terminal), info and up."""
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer()
        if sys.stderr.isatty()
        else structlog.processors.JSONRenderer()
    )
    # asyncio warns on every TLS close that nats-py's protocol handles; it is not actionable.
    logging.getLogger("asyncio").setLevel(logging.ERROR)
    structlog.configure(
        processors=[structlog.processors.add_log_level, structlog.processors.TimeStamper("iso"),
                    structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
    )


def guarded(app: Callable[[], object]) -> None:
    """Run a typer app; a user's mistake becomes one line on stderr, never a traceback."""
    configure_logging()
    try:
        app()
    except (BrokerError, SecurityError) as exc:
        typer.echo(f"mas: {exc}", err=True)
        sys.exit(1)
    except OSError as exc:
        # A file or folder mas writes is in the way or not accessible (IsADirectoryError,
        # FileExistsError, PermissionError, ...): say what and where, without a traceback.
        where = f": {exc.filename}" if exc.filename is not None else ""
        typer.echo(f"mas: {exc.strerror or exc}{where}", err=True)
        sys.exit(1)
    except ValidationError as exc:
        # a value that reached a model unchecked (a setting, an argument): name it, no traceback
        first = exc.errors()[0]
        where = ".".join(map(str, first["loc"])) or exc.title
        typer.echo(f"mas: {where}: {first['msg']}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.echo("mas: interrupted", err=True)
        sys.exit(130)


def main() -> None:
    if sys.argv[1:2] == ["agent"] and sys.argv[2:3] and sys.argv[2] in AGENT_PROCESS_COMMANDS:
        from mas.agent_cli import agent_app

        app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False,
                          add_completion=False)
        app.add_typer(agent_app, name="agent")
        guarded(app)
        return
    from mas.cli import main as whole_cli

    whole_cli()
