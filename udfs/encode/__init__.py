"""Encoding items: the sentence and image encoders, embed's input rules and the batches Spark ships."""
