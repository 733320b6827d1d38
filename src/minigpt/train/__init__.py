"""Training: the loop (`trainer`), optimizer and LR schedule (`optim`), checkpoints and resume
(`checkpoints`), process-group setup (`distributed`), logging (`logger`), pre-training wiring
(`pretrain`) and loss plots (`plot`). Fine-tuning reuses the same Trainer with other batches."""
