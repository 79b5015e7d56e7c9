"""Text: the tokenizer, the chat template and the thinking channel."""
