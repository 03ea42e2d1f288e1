"""One DeftTrainer step on a tiny LoRA BERT; run plain or under torchrun (gloo). Writes the update.

Usage: python ddp_worker.py OUT_FILE PER_DEVICE_BATCH
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from deft.train.trainer import DeftTrainer, DensityConfig  # noqa: E402
from test_trainer import pad_features, sgd_step_args, tiny_lora_bert, toy_dataset  # noqa: E402

out_file, per_device = sys.argv[1], int(sys.argv[2])
model = tiny_lora_bert()
before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
args = sgd_step_args(
    Path(out_file).parent / "ckpt",
    per_device,
    ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
)
density = DensityConfig(alpha=1.0, eps=1e-2, target_density=None, alpha_warmup=0.0)  # the loss alone, from step 1
trainer = DeftTrainer(model, args, density=density, train_dataset=toy_dataset(), data_collator=pad_features)
trainer.train()
if trainer.is_world_process_zero():
    delta = {n: (p.detach() - before[n]).flatten().tolist() for n, p in model.named_parameters() if p.requires_grad}
    log = [h for h in trainer.state.log_history if "task_loss" in h][0]
    Path(out_file).write_text(json.dumps({"delta": delta, "world_size": args.world_size, "log": log}))
