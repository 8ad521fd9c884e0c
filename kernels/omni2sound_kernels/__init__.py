"""The Triton kernels of omni2sound, installed as ``omni2sound.kernels`` (one module per op).

On a GPU they run compiled; on the CPU only under ``TRITON_INTERPRET=1`` (set before importing triton), which the
tests use. ``omni2sound.ops`` decides when they run (``omni2sound.ops._dispatch.triton_available``).

Why the package is ``kernels/omni2sound_kernels/`` and not ``kernels/`` itself: the repository root is on
``sys.path`` whenever Python runs from it (``python -m pytest``, ``python -m omni2sound.train``), and a top-level
``kernels/__init__.py`` would shadow PyPI's ``kernels``, which transformers imports when it loads a model.
``kernels/`` has no ``__init__.py``, so from the root it is at most a namespace candidate and PyPI's regular
package wins; this folder is a regular package, so the editable install's finder and a wheel both import it as
``omni2sound.kernels``.
"""
