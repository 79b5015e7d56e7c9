"""Block-diffusion fine-tuning: corruption, the training mask, the loss, LoRA, data and the trainer."""
