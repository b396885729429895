"""`refiner-source backfill`: past responses from Refiner's REST API, with its progress display."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading

import click

from refiner_source.logs import configure_logging
from refiner_source.run.options import DATE, check_range, open_outbox, settings_or_exit


@click.command()
@click.option("--since", type=DATE, help="Responses completed at or after this date (UTC).")
@click.option("--until", type=DATE, help="... and before this date (UTC).")
@click.option("--form", "form_uuid", metavar="UUID", help="Only this survey.")
@click.option("--dry-run", is_flag=True, help="Print what would be sent; store nothing.")
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=os.cpu_count() or 1,
    show_default="the number of CPUs",
    help="Processes that map pages while this one fetches and stores; 0 maps in this process.",
)
def backfill(since, until, form_uuid: str | None, dry_run: bool, workers: int) -> None:
    """Read past responses from Refiner's REST API and send them as a webhook would have.

    Safe to stop (Ctrl-C) and to run again: it resumes, and never sends a response twice.
    """
    from refiner_source.config import key_of
    from refiner_source.privacy import Suppressed
    from refiner_source.refiner_rest import BackfillError, RefinerClient
    from refiner_source.to_segment.backfill import filters, run_backfill

    check_range(since, until)
    settings = settings_or_exit("REFINER_API_KEY")
    configure_logging("WARNING" if settings.log_level == "INFO" else settings.log_level)
    outbox = open_outbox(settings)
    outbox.init_schema()
    stop = threading.Event()
    display = _BackfillDisplay(sys.stderr.isatty())

    def on_retry(problem: str, wait: float, attempt: int, of: int) -> None:
        display.note(f"Refiner's API: {problem}; retry {attempt} of {of} in {wait:.1f} s")

    api = RefinerClient(settings.refiner_api_url, settings.refiner_api_key, stop=stop, on_retry=on_retry)

    def on_interrupt(_signum, _frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        saved = "" if dry_run else "; progress is saved either way"
        display.note(f"stopping after this page (Ctrl-C again to stop at once{saved})")

    signal.signal(signal.SIGINT, on_interrupt)
    signal.signal(signal.SIGTERM, on_interrupt)
    query = filters(since, until, form_uuid)
    try:
        progress = run_backfill(
            api,
            outbox,
            settings.rules,
            query,
            dry_run=dry_run,
            report=display,
            should_stop=stop.is_set,
            workers=workers,
            suppressed=Suppressed(outbox, key_of(settings)),
        )
    except BackfillError as exc:
        display.close()
        raise click.ClickException(f"{exc}" + ("" if dry_run else " (progress is saved: run the same command again to resume)")) from None
    display.close()
    verb = "would be new" if dry_run else "stored for delivery"
    click.echo(
        f"{progress.seen} response(s) read in {progress.pages} page(s): {progress.stored} {verb}, "
        f"{progress.duplicates} already sent, {progress.not_completed} not completed, {progress.invalid} not valid (see the log)"
        + (f", {progress.forgotten} forgotten (people erased by `refiner-source forget`: not stored)" if progress.forgotten else "")
    )
    if dry_run and progress.sample:
        click.echo(f"first {len(progress.sample)} message(s) that would be sent (of responses not sent before):")
        for message in progress.sample:
            click.echo(json.dumps(message, indent=2, ensure_ascii=False))
    elif dry_run:
        click.echo("no message would be sent: none of the responses read is new")
    if stop.is_set():
        click.echo("stopped before the end" + ("" if dry_run else ": run the same command again to resume"), err=True)
        sys.exit(130)


class _BackfillDisplay:
    """A progress bar on a terminal; a plain line per page otherwise (logs, CI, Heroku one-off dynos)."""

    def __init__(self, tty: bool) -> None:
        self.tty = tty
        self.width = 0

    def __call__(self, p) -> None:
        of = f"/{p.last_page}" if p.last_page else ""
        line = (
            f"page {p.pages}{of}  read {p.seen:,}  new {p.stored:,}  already sent {p.duplicates:,}  "
            f"skipped {p.not_completed + p.invalid:,}  {p.rate:,.0f}/s"
        )
        if self.tty:
            bar = ""
            if p.last_page:
                done = min(p.pages / p.last_page, 1.0)
                bar = "[" + "#" * int(done * 24) + "-" * (24 - int(done * 24)) + "] "
            text = bar + line
            click.echo("\r" + text.ljust(self.width), nl=False, err=True)
            self.width = len(text)
        else:
            click.echo(line, err=True)

    def note(self, text: str) -> None:
        """A line of its own (a retry, a stop), below the bar on a terminal."""
        if self.tty and self.width:
            click.echo("\r" + " " * self.width + "\r", nl=False, err=True)
            self.width = 0
        click.echo(text, err=True)

    def close(self) -> None:
        if self.tty and self.width:
            click.echo("", err=True)
