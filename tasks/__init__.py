"""The data layer's SeqIO tasks, imported as ``dss_jax.tasks`` (setup.py maps this top-level ``tasks/`` folder there).

The folder stays at the top level, where the project's layout puts it beside ``gin/`` and ``launch/``; the import
name stays inside the ``dss_jax`` namespace, since a top-level package called ``tasks`` would collide with other
installed projects'. So ``tasks/registry.py`` is ``dss_jax.tasks.registry``, and gin files import it as
``from dss_jax.tasks import registry``. This is the only package here whose folder and import name differ.

Only this package imports TensorFlow and seqio (the model, trainer and decoding never do).
"""
