"""The run's length and evaluation points, in steps or in real images shown to D (owns: the budget rule).

A step shows D `batch_size x draws` real images (draws: real batches a step consumes; a GAN's D takes a fresh batch
per D step, so draws = optim.d_iters). A budget in images (train.max_images, Lucic et al. 2018's protocol) is
therefore the same whatever the batch size or D steps; the steps follow from it, rounded up so that at least the
budget is shown. Evaluations every `eval.every_images` fall on the first step whose images reach each multiple.
"""

from __future__ import annotations

from dataclasses import dataclass

from gancore.config import Config


@dataclass(frozen=True)
class Budget:
    images_per_step: int  # real images D sees in one step (global batch x draws)
    total_steps: int
    eval_every: int  # steps between evaluations (eval.every), 0 when counted in images or off
    eval_every_images: int  # real images between evaluations (eval.every_images), 0 when counted in steps or off

    def images(self, step: int) -> int:
        """Real images shown to D after `step` steps."""
        return step * self.images_per_step

    def eval_due(self, step: int) -> bool:
        """Whether the evaluation schedule (not the end of the run) evaluates after `step`."""
        if self.eval_every:
            return step % self.eval_every == 0
        if self.eval_every_images:
            return self.images(step) // self.eval_every_images > self.images(step - 1) // self.eval_every_images
        return False


def budget(cfg: Config, steps_per_epoch: int, draws: int) -> Budget:
    """The run's budget from the config: train.max_images, else train.max_steps, else train.epochs."""
    per_step = cfg.optim.batch_size * draws
    if cfg.train.max_images:
        total = -(-cfg.train.max_images // per_step)  # ceil: at least the budget
    else:
        total = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
    return Budget(per_step, total, cfg.eval.every, cfg.eval.every_images)
