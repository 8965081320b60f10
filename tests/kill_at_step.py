"""`python tests/kill_at_step.py STAGE STEP finetune-args...`: run the CLI and SIGKILL this very process
when stage STAGE is about to begin the step after STEP completed steps — a `kill -9` during training at
a known step, with no timing race against a polling test."""

from __future__ import annotations

import os
import signal
import sys

from transformers import TrainerCallback

from finetune.cli import main
from finetune.stages import sft

STAGE, STEP = sys.argv[1], int(sys.argv[2])


class _KillDuringStep(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        if f"/{STAGE}/" in f"{args.output_dir}/" and state.global_step == STEP:
            os.kill(os.getpid(), signal.SIGKILL)


class _Trainer(sft.SFTTrainer):
    def __init__(self, *args, callbacks=None, **kwargs):
        super().__init__(*args, callbacks=[*(callbacks or []), _KillDuringStep()], **kwargs)


sft.SFTTrainer = _Trainer
sys.exit(main(sys.argv[3:]))
