"""Early stopping on the validation loss: the run ends once ``patience`` validations in a row have not improved
on the best by more than ``min_delta`` nats. The state travels in every checkpoint, so a resumed run stops
where the uninterrupted one would have, and a run that stopped early is not trained further by a rerun.

The final model is the one at the stopping step (at most ``patience`` validations past the best, whose loss and
step ``summary.json`` records): a reference LM or student that has begun to overfit its few repeated tokens
has lost little by then, and keeping a second copy of the weights is not worth it at any scale.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass
class EarlyStop:
    patience: int = 0                      # validations in a row without improvement that end the run (0: off)
    min_delta: float = 0.0                 # an improvement is a loss below best - min_delta
    best: float = math.inf
    best_step: int = 0
    bad: int = 0                           # validations since the best
    stopped: bool = False

    def update(self, step: int, loss: float) -> bool:
        """Record the validation at ``step``; True when the run should end here."""
        if loss < self.best - self.min_delta:
            self.best, self.best_step, self.bad = loss, step, 0
        else:
            self.bad += 1
        self.stopped = self.patience > 0 and self.bad >= self.patience
        return self.stopped

    def state_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("patience", "min_delta")}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)

    def summary(self) -> dict:
        """What summary.json says about it (nothing while it is off)."""
        if not self.patience:
            return {}
        return {"best_val_loss": self.best, "best_step": self.best_step, "stopped_early": self.stopped}
