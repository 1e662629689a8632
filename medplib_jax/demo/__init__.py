"""`medplib demo`: the embedded application on top of the library (data, training, eval, infer)."""
