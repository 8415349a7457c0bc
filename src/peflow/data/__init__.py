"""Datasets: the built-in procedural corpus (`peflow.data.synth`) and the
readers every stage uses (`peflow.data.formats`) for it, LAION-style
image-text shards and the PE Video Dataset."""
