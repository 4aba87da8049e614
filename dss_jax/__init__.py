"""dss_jax: distilling step-by-step on JAX/Flax.

Data path: ``dss_jax.tasks`` (SeqIO tasks, TensorFlow) -> feature conversion -> numpy batches ->
``dss_jax.trainer`` (train step on a mesh) -> ``dss_jax.checkpoints`` (Orbax) -> ``dss_jax.evaluate``.
Importing ``dss_jax`` itself imports neither TensorFlow nor seqio.
"""

__version__ = "0.1.0"
