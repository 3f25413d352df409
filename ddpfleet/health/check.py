"""A health check's row and its verdicts: pass, warn (shown, never refused), fail (refused)."""

from __future__ import annotations

from dataclasses import dataclass

PASS, WARN, FAIL = "pass", "warn", "fail"
ORDER = {PASS: 0, WARN: 1, FAIL: 2}


@dataclass(frozen=True)
class Check:
    node: str
    check: str
    value: str
    verdict: str  # pass | warn | fail
    fix: str = ""

    @property
    def line(self) -> str:
        """The one-line reason (train's refusal): `node0: ecc: GPU 3: 2 uncorrected; fix: ...`"""
        return f"{self.node}: {self.check}: {self.value}" + (
            f"; fix: {self.fix}" if self.fix else ""
        )


def worst(checks) -> str:
    return max((c.verdict for c in checks), key=ORDER.__getitem__, default=PASS)
