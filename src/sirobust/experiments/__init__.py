"""The paper's computations: the logit-rescaling study (rescale.py) and the figures' data (figures.py, drawn by
plotting.py). :mod:`sirobust.reproduce` drives them; nothing here imports it."""
