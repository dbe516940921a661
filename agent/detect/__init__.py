"""Detection on the device: the interpreter seam, features, the streaming detector, novelty,
and the analyzer stage that feeds it from readings.
"""
