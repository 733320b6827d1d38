"""Training: the loop (`trainer`), a run's lifecycle (`run`), the stages (`pretrain`, `sft`, `dpo`,
each on the same Trainer; the fine-tuning ones share `finetune`), optimizer and LR schedule
(`optim`), checkpoints and resume (`checkpoints`), process-group setup (`distributed`), logging
(`logger`) and loss plots (`plot`)."""
