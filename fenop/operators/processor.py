"""Processor: the base of fenop's processors, which describe themselves.

A processor's constructor is the one declaration of its options: the base class
records the arguments each instance was built with (defaults filled in), so that
the model description (:mod:`fenop.train.models`) can write them out and build
the same processor again, and nothing repeats the constructor by hand.

Two kinds, told apart by the class attribute ``mesh_native``:

- grid processors (FNO, MgNO, LSM): ``cls(in_channels, out_channels, **options)``
  on ``(B, C, *grid)`` tensors, which :class:`~fenop.operators.FEOperator`
  reaches through a grid encoder and decoder;
- mesh-native processors (FEMultigrid): ``cls(spaces, in_channels, out_channels,
  **options)`` on the FE coefficients of the finest of ``spaces``.

>>> from fenop.operators import MgNO
>>> MgNO(3, 1, grid=(16, 16), width=8).options["width"]
8
"""

from __future__ import annotations

import functools
import inspect
from typing import ClassVar

from fenop.operators._module import KeepsComplexModule


class Processor(KeepsComplexModule):
    """Base class of processors: ``in_channels``, ``out_channels`` and ``options``.

    Attributes:
        mesh_native: ``False`` for grid processors, ``True`` for processors on FE
            coefficients (which then also have ``spaces``, coarsest first, and
            ``space``, the finest).
        options: the keyword options this instance was built with, defaults filled
            in (for an FNO also the neuraloperator options it passes on).
    """

    mesh_native: ClassVar[bool] = False
    in_channels: int
    out_channels: int
    options: dict

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "__init__" not in cls.__dict__:
            return
        init = cls.__init__
        signature = inspect.signature(init)

        @functools.wraps(init)
        def recording_init(self, *args, **kwargs):
            init(self, *args, **kwargs)
            # A subclass's constructor runs last: its record replaces its parent's.
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            options = {}
            for name, parameter in signature.parameters.items():
                if parameter.kind is parameter.KEYWORD_ONLY:
                    options[name] = bound.arguments[name]
                elif parameter.kind is parameter.VAR_KEYWORD:
                    options.update(bound.arguments.get(name, {}))
            self.options = options

        cls.__init__ = recording_init
