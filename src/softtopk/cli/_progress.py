"""A progress bar for long sweeps: tqdm when installed and stderr is a terminal, else plain lines."""

from __future__ import annotations

import sys
import time


class Progress:
    """``with Progress(total, "bench") as p: p.step("label")`` advances by one and shows the label."""

    def __init__(self, total: int, desc: str, *, enabled: bool = True) -> None:
        self.total, self.desc, self.enabled = total, desc, enabled
        self.done = 0
        self.start = time.perf_counter()
        self.bar = None
        if enabled and sys.stderr.isatty():
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, desc=desc, unit="run", leave=False, file=sys.stderr)
            except ImportError:
                self.bar = None

    def step(self, label: str) -> None:
        """Announces the next item (the previous one is counted as done)."""
        if not self.enabled:
            return
        if self.bar is not None:
            if self.done:
                self.bar.update(1)
            self.bar.set_postfix_str(label[-60:], refresh=True)
        else:
            elapsed = time.perf_counter() - self.start
            print(f"  [{self.done + 1}/{self.total} {elapsed:6.0f}s] {label}", file=sys.stderr, flush=True)
        self.done += 1

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.update(1 if self.done else 0)
            self.bar.close()
