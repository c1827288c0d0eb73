"""The one benchmark run loop: run folder, resume, lock, warm-up, progress, per-sample errors,
results.json, RESULTS.md and DONE.

A benchmark is a :class:`Benchmark`: how to process one (sample, unit), its statistics and its
Markdown; :func:`run_benchmark` does everything else, from typed :class:`RunSettings`.

Resume rules (issue #16):

- the run folder is ``<output_dir>/<task_name>[_chunk<K>of<N>]_<timestamp>``: shards launched
  with one task name get their own folders;
- an unfinished folder of the task is continued only when the settings that shape results
  (``RunSettings.settings``) equal those stored in its config.json; otherwise the run is refused
  with one line naming the keys. A folder without records (a failed start) is reused when its
  settings match and otherwise left alone (a new folder is made). config.json is never rewritten
  once records exist;
- the folder is locked while a run writes it: a second run at once is refused with one line;
- any exception of one sample (not KeyboardInterrupt) is recorded as ``{id, ..., error}`` and
  the run goes on; ``retry_failed`` runs those samples again, replacing their failed records.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from common.errors import sample_failure
from common.progress import progress
from common.results import RunFolder
from common.run_index import results_root_of, update_index

if TYPE_CHECKING:  # torch is imported where it is used, so a CLI's --help needs none
    import torch

log = logging.getLogger(__name__)

CPU_NOTICE = ("CPU timings: not representative of a GPU (both models share the CPU cores; "
              "speedups measured here say nothing about a GPU run).")
CPU_4BIT_NOTICE = ("4-bit on CPU: bitsandbytes' CPU path dequantizes at every step; its timings do not show "
                   "what 4-bit costs on a GPU.")


@dataclass(frozen=True)
class RunSettings:
    """What a benchmark run needs from its command line, typed.

    ``settings`` are the values that shape the results (dataset, split, models, quant, gamma,
    max_new_tokens, drafter, ...): stored in config.json and compared on resume. ``config`` is
    everything else worth recording (all flags).
    """

    stage: str
    task_name: str
    settings: Mapping[str, Any]
    config: Mapping[str, Any] = field(default_factory=dict)
    argv: Sequence[str] = ()
    output_dir: str | None = None
    resume: bool = True
    retry_failed: bool = False
    warmup_steps: int = 1
    num_chunks: int = 1
    chunk_idx: int = 0
    device: str = "cpu"
    quant: str | None = None
    torch_threads: int | None = None
    desc: str | None = None

    @property
    def folder_task(self) -> str:
        """The task name of the run folder; a shard of a sharded run gets its own."""
        if self.num_chunks > 1:
            return f"{self.task_name}_chunk{self.chunk_idx}of{self.num_chunks}"
        return self.task_name


class Benchmark:
    """What a benchmark defines over the harness; override :meth:`process`, :meth:`statistics`,
    :meth:`render` (and :meth:`units`, :meth:`warmup`, :meth:`begin`, :meth:`finish` where needed).

    A sample yields one record per unit (``units``); ``unit_field`` names the record key that
    holds the unit (None: one record per sample).
    """

    unit_field: str | None = None
    event_frames: int | None = None  # the draft's event-frame count: its PNG check runs before the timers

    def units(self, sample: Any) -> Sequence[str]:
        return ("",)

    def base_record(self, sample: Any, unit: str) -> dict[str, Any]:
        """The identifying fields every record of ``sample`` (failed ones too) carries."""
        record = {"id": sample.id, "split": sample.split, "query": sample.question}
        if self.unit_field:
            record[self.unit_field] = unit
        return record

    def warmup(self, sample: Any, steps: int) -> None:
        """Untimed work before the timed loop (``steps`` = --warmup_steps)."""

    def untimed_checks(self, sample: Any) -> None:
        """Per-sample work run before :meth:`process`, outside its timers: the comparison of a clip's
        stored event PNGs with its events (once per clip), which the timed load would pay for, and the
        clip's decoded video frames put in the on-disk frame cache, so every timed row (the baseline first,
        then each drafter) loads them the same way instead of the first row alone decoding the mp4."""
        if self.event_frames and getattr(sample, "event_path", None) is not None:
            from common.data import check_event_images

            check_event_images(sample, self.event_frames)
        if getattr(sample, "frame_cache", None) is not None:
            from common.data import warm_frame_cache

            warm_frame_cache(sample)

    def process(self, sample: Any, unit: str, done: Mapping[tuple[str, str], dict]) -> dict[str, Any] | None:
        """The record of one unit of one sample (None: nothing to record). ``done``: records so far."""
        raise NotImplementedError

    def statistics(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        raise NotImplementedError

    def render(self, stats: dict[str, Any], records: list[dict[str, Any]], run: RunFolder) -> str:
        raise NotImplementedError

    def begin(self, run: RunFolder) -> None:
        """Once the models are loaded, before the loop (e.g. record the chosen checkpoints in config.json)."""

    def finish(self, stats: dict[str, Any], records: list[dict[str, Any]], run: RunFolder) -> None:
        """Plots and other extra outputs (after results.json and RESULTS.md)."""

    def key(self, record: Mapping[str, Any]) -> tuple[str, str]:
        """(unit, id) of a record."""
        return (str(record.get(self.unit_field, "")) if self.unit_field else "", str(record["id"]))


def pin_cpu_threads(device: str | torch.device, lanes: int = 1) -> int:
    """On a CPU, fix torch's intra-op threads so ``lanes`` models running at once share the cores
    evenly (cores // lanes each); returns the thread count each lane uses."""
    import torch

    if torch.device(device).type != "cpu":
        return torch.get_num_threads()
    threads = max(1, (os.cpu_count() or 1) // max(1, lanes))
    torch.set_num_threads(threads)
    return threads


def start_run(settings: RunSettings) -> RunFolder:
    """The run folder to write (new, or the unfinished one of this task with the same settings)."""
    return RunFolder.create(settings.stage, settings.folder_task, settings.output_dir, resume=settings.resume,
                            settings=settings.settings, include_done=settings.retry_failed)


def _prepare(run: RunFolder, settings: RunSettings) -> list[dict[str, Any]]:
    """Write config.json for a new run, drop failed records when retrying; the records so far."""
    if not run.load_records() or not (run.path / "config.json").is_file():
        config = {**settings.config, "torch_threads": settings.torch_threads, "cpu_cores": os.cpu_count()}
        run.write_config(config, list(settings.argv), settings=settings.settings)
    if settings.retry_failed:
        dropped = run.drop_failed()
        run.clear_done()
        log.info("retrying %d failed records", dropped)
    return run.load_records()


def _run_one(bench: Benchmark, sample: Any, unit: str, done: Mapping) -> dict[str, Any] | None:
    """One unit, its failure recorded: any exception but KeyboardInterrupt/SystemExit becomes ``error``."""
    from common.timing import gc_paused

    try:
        bench.untimed_checks(sample)
        with gc_paused():  # no collector pause inside the timed stages
            return bench.process(sample, unit, done)
    except Exception as exc:  # noqa: BLE001 - one bad sample must not stop the run (issue #16)
        text = sample_failure(exc)
        text = " ".join(text.split())  # one line in the record and the log
        log.warning("skipping %s%s: %s", sample.id, f" ({unit})" if unit else "", text)
        return {**bench.base_record(sample, unit), "error": text}


def _loop(run: RunFolder, settings: RunSettings, bench: Benchmark, samples: Sequence[Any],
          done: dict[tuple[str, str], dict]) -> None:
    import torch

    todo = [(s, [u for u in bench.units(s) if (u, str(s.id)) not in done]) for s in samples]
    todo = [(s, units) for s, units in todo if units]
    with torch.no_grad():
        if todo:
            try:
                bench.warmup(todo[0][0], settings.warmup_steps)
            except Exception as exc:  # noqa: BLE001 - the timed loop records this sample's error
                log.warning("warm-up on %s failed (%s); going on without it", todo[0][0].id, exc)
        for sample, units in progress(todo, settings.desc or settings.stage, "sample"):
            for unit in units:
                record = _run_one(bench, sample, unit, done)
                if record is not None:
                    run.append_record(record)
                    done[bench.key(record)] = record


def _records(run: RunFolder, bench: Benchmark, samples: Sequence[Any]) -> list[dict[str, Any]]:
    """This run's records of ``samples``, one per key (the last written wins), in file order."""
    ids = {str(s.id) for s in samples}
    records = run.load_records()
    last = {bench.key(r): i for i, r in enumerate(records)}
    return [r for i, r in enumerate(records) if str(r["id"]) in ids and last[bench.key(r)] == i]


def notices(device: str, quant: str | None) -> list[str]:
    """Lines for the top of RESULTS.md that say when timings are not to be trusted."""
    from common.cli import resolve_device

    if resolve_device(device).type != "cpu":
        return []
    return [CPU_NOTICE] + ([CPU_4BIT_NOTICE] if quant == "4bit" else [])


def with_notices(text: str, device: str, quant: str | None) -> str:
    """``text`` (a RESULTS.md) with the timing notices of ``device``/``quant`` after its title line."""
    extra = notices(device, quant)
    if not extra:
        return text
    title, _, rest = text.partition("\n")
    return "\n".join([title, "", *(f"**{n}**" for n in extra), rest])


def write_readouts(run: RunFolder, stage: str, records: list[dict[str, Any]], stats: dict[str, Any],
                   markdown: str, device: str, quant: str | None) -> None:
    """results.json and RESULTS.md (with its notices) of a run, or of merged shards (scripts.merge_results)."""
    run.write_results(records, stats, extra={"stage": stage})
    run.write_markdown(with_notices(markdown, device, quant))


def run_benchmark(settings: RunSettings, samples: Sequence[Any], make_bench: Callable[[], Benchmark]
                  ) -> dict[str, Any]:
    """Run (or resume) the benchmark ``make_bench()`` builds over ``samples``; returns {"run_dir", "statistics"}.

    The folder is chosen, checked and locked before ``make_bench`` loads any model; a folder that
    cannot be used raises :class:`~common.results.RunFolderError` (one line).
    """
    run = start_run(settings)
    with run.lock():
        done = _prepare(run, settings)
        bench = make_bench()
        bench.begin(run)
        done = {bench.key(r): r for r in done}
        log.info("run folder %s: %d samples, %d records so far", run.path, len(samples), len(done))
        _loop(run, settings, bench, samples, done)
        records = _records(run, bench, samples)
        stats = bench.statistics(records)
        stats.update(torch_threads=settings.torch_threads, device=str(settings.device))
        write_readouts(run, settings.stage, records, stats, bench.render(stats, records, run), settings.device,
                       settings.quant)
        bench.finish(stats, records, run)
        run.mark_done()
    update_index(results_root_of(run.path))
    log.info("results: %s", run.path / "RESULTS.md")
    return {"run_dir": str(run.path), "statistics": stats}


def exit_code(result: Mapping[str, Any]) -> int:
    """1 when every sample failed (nothing measured), else 0."""
    stats = result.get("statistics", {})
    return 1 if not stats.get("num_samples") and stats.get("num_failed") else 0
