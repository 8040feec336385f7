"""FEOperator: encoder + processor + decoder, FE functions in and out.

>>> import torch
>>> from fenop.fem import FunctionSpace, unit_square
>>> from fenop.operators import FNO
>>> space = FunctionSpace(unit_square(17), dirichlet="boundary")
>>> model = FEOperator(space, space, FNO(4, 1, n_modes=(8, 8), hidden_channels=8), resolution=16)
>>> u = model(torch.randn(2, 1, space.n_dofs))
>>> u.shape, u[..., space.boundary_dofs].abs().max().item()
(torch.Size([2, 1, 289]), 0.0)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from fenop._types import FETensor
from fenop.fem import FEDecoder, FunctionSpace, GridEncoder, Normalizer
from fenop.fem.decoders import BoundaryValues, boundary_tensor, impose_dirichlet
from fenop.fem.interpolation import SpaceInterpolator
from fenop.fem.mesh import bounding_box
from fenop.operators._module import KeepsComplexModule


class FEOperator(KeepsComplexModule):
    """A neural operator between FE spaces: ``(B, C_in, n_dofs_in) -> (B, C_out, n_dofs_out)``.

    With a grid processor (FNO, MgNO, LSM) the input is encoded on a grid over the
    mesh's bounding box (values, domain mask, coordinates), processed, and decoded to
    the output space's DOFs. A mesh-native processor (:class:`FEMultigrid`) works on
    the coefficients of its finest space: inputs on another mesh of the domain are
    interpolated into that space, and its outputs into ``space_out``
    (:class:`~fenop.fem.SpaceInterpolator`). Either way the Dirichlet DOFs of
    ``space_out`` are then set to the boundary values exactly.

    With a ``constraint`` (:class:`~fenop.operators.HardConstraint` or
    :class:`~fenop.operators.MoEConstraint`) the processor emits ``1 + N`` channels:
    a prediction and ``N`` basis fields (set to zero on the Dirichlet DOFs), and the
    output is the constraint's: the prediction corrected in the span of the basis so
    that the PDE's residual vanishes against it. The residual's inputs are the
    model's input fields, named by ``constraint_inputs``. A grid processor's basis
    is handed over on its grid where the constraint takes it so
    (``constraint.takes_grid_basis``: the global Galerkin solve of a linear system),
    and decoded to the mesh otherwise.

    Args:
        space_in, space_out: FE spaces of input and output.
        processor: an ``nn.Module`` with ``in_channels`` and ``out_channels``; for a
            grid processor ``in_channels`` counts the encoder's extra channels too
            (``GridEncoder.out_channels``).
        resolution: grid points per axis (grid processors only).
        input_stats, output_stats: optional per-channel statistics, a
            :class:`~fenop.fem.Normalizer` or its ``(mean, std)``: inputs are
            normalised with the first, outputs un-normalised with the second.
        boundary_values: Dirichlet data (see :class:`~fenop.fem.FEDecoder`).
        constraint: a hard constraint on ``space_out`` (its residual's space).
        constraint_inputs: the residual's name for each input channel (e.g.
            ``("a",)`` for Darcy's permeability), ``None`` for a channel the residual
            does not take (the older states of a stepper's history).
    """

    def __init__(
        self,
        space_in: FunctionSpace,
        space_out: FunctionSpace,
        processor: nn.Module,
        *,
        resolution: int | Sequence[int] | None = None,
        input_stats: Normalizer | tuple[Sequence[float], Sequence[float]] | None = None,
        output_stats: Normalizer | tuple[Sequence[float], Sequence[float]] | None = None,
        boundary_values: BoundaryValues | None = None,
        constraint: nn.Module | None = None,
        constraint_inputs: Sequence[str] = ("a",),
    ):
        super().__init__()
        for name, space in (("space_in", space_in), ("space_out", space_out)):
            if not isinstance(space, FunctionSpace):
                raise TypeError(f"`{name}` must be a FunctionSpace, got {type(space).__name__}")
        if not all(hasattr(processor, a) for a in ("in_channels", "out_channels")):
            raise TypeError("`processor` must have `in_channels` and `out_channels` attributes")
        self.space_in, self.space_out, self.processor = space_in, space_out, processor
        # Told by what the processor declares (fenop.operators.processor), not its class.
        self.native = bool(getattr(processor, "mesh_native", False))
        self.resolution = resolution
        if self.native:
            if resolution is not None:
                raise ValueError("`resolution` is for grid processors; FEMultigrid has no grid")
            # The processor's finest space plays the grid's part: inputs on other
            # meshes are interpolated into it, outputs from it into `space_out`.
            fine = processor.space
            self.encoder = None if space_in.same_dofs(fine) else SpaceInterpolator(space_in, fine)
            self.decoder = None if fine.same_dofs(space_out) else SpaceInterpolator(fine, space_out)
            self.in_channels = processor.in_channels
            if boundary_values is not None and len(space_out.boundary_dofs) == 0:
                raise ValueError("`boundary_values` given but `space_out` has no Dirichlet DOFs")
            dofs = torch.from_numpy(space_out.boundary_dofs)
            self.register_buffer("boundary_dofs", dofs, persistent=False)
            g = boundary_tensor(space_out, boundary_values)
            self.register_buffer("boundary_values", g, persistent=False)
        else:
            if resolution is None:
                raise ValueError("`resolution` is required with a grid processor")
            self.encoder = GridEncoder(space_in, resolution)
            self.decoder = FEDecoder(space_out, resolution, boundary_values=boundary_values)
            self.in_channels = processor.in_channels - self.encoder.extra_channels
            if self.in_channels < 1:
                raise ValueError(
                    f"the processor takes {processor.in_channels} channels, but the encoder "
                    f"alone adds {self.encoder.extra_channels} (mask and coordinates)"
                )
        self.out_channels = processor.out_channels
        self.constraint, self.constraint_inputs = constraint, tuple(constraint_inputs)
        if constraint is not None:
            self._check_constraint()
            self.out_channels = 1  # the constrained field; the rest are its basis
        self.input_stats = Normalizer.of(input_stats)
        self.output_stats = Normalizer.of(output_stats)
        for name, stats, channels in (
            ("input_stats", self.input_stats, self.in_channels),
            ("output_stats", self.output_stats, self.out_channels),
        ):
            if stats is not None and stats.channels != channels:
                raise ValueError(
                    f"`{name}` has statistics of {stats.channels} channels for {channels}"
                )
        # A real parameter tells the model's dtype (FNO's spectral weights are complex
        # whatever it is); found once here rather than searched in every forward.
        self._dtype_parameter = next(
            (name for name, w in processor.named_parameters() if w.is_floating_point()), None
        )

    @property
    def dtype(self) -> torch.dtype | None:
        """The model's floating dtype (what its inputs must have), or ``None`` for a
        processor without real parameters."""
        if self._dtype_parameter is None:
            return None
        return self.processor.get_parameter(self._dtype_parameter).dtype

    def _check_constraint(self) -> None:
        space = getattr(self.constraint, "space", None)
        if space is None or not space.same_dofs(self.space_out):
            raise ValueError("`constraint` must be built on the residual of `space_out`")
        if not self.space_in.same_dofs(self.space_out):
            raise ValueError("a constrained model needs its inputs on `space_out` (the residual's)")
        if self.processor.out_channels < 2:
            raise ValueError(
                "with a constraint the processor emits a prediction and at least one basis "
                f"field, so at least 2 channels; it has {self.processor.out_channels}"
            )
        if len(self.constraint_inputs) != self.in_channels:
            raise ValueError(
                f"`constraint_inputs` must name each of the {self.in_channels} input "
                f"channels, got {list(self.constraint_inputs)}"
            )

    @property
    def n_basis(self) -> int:
        """Basis fields the processor emits for the constraint (0 without one)."""
        return 0 if self.constraint is None else self.processor.out_channels - 1

    def _unnormalised(self, y: torch.Tensor) -> torch.Tensor:
        """Outputs ``(B, C, ...)`` in physical units: the prediction channel shifted and
        scaled by the output statistics, basis fields (with a constraint) scaled only."""
        if self.output_stats is None:
            return y
        if self.constraint is None:
            return self.output_stats.decode(y)
        basis = y[:, 1:] * self.output_stats.std.to(y.dtype)
        return torch.cat([self.output_stats.decode(y[:, :1]), basis], dim=1)

    def forward(self, x: FETensor, *, boundary_values: torch.Tensor | None = None) -> FETensor:
        """``(B, C_in, n_dofs_in)`` -> ``(B, C_out, n_dofs_out)``, Dirichlet DOFs exact."""
        if x.ndim != 3 or x.shape[1:] != (self.in_channels, self.space_in.n_dofs):
            raise ValueError(
                f"input must have shape (batch, {self.in_channels}, {self.space_in.n_dofs}), "
                f"got {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise TypeError(f"input must be a floating-point tensor, got {x.dtype}")
        dtype = self.dtype
        if dtype is not None and dtype != x.dtype:
            # Caught here: the processor's own error names a convolution's bias.
            raise ValueError(
                f"input is {x.dtype} but the model is {dtype}: convert the input "
                f"(x.to({dtype})) or the model (model.to({x.dtype}))"
            )
        # Under autocast (mixed precision) only the processor runs in low precision:
        # the FE maps, the statistics and the boundary values stay in x's dtype, so
        # Dirichlet values remain exact and the output has the input's dtype.
        fields = x
        with torch.autocast(x.device.type, enabled=False):
            if self.input_stats is not None:
                x = self.input_stats.encode(x)
            z = x if self.encoder is None else self.encoder(x)
        y = self.processor(z)
        with torch.autocast(x.device.type, enabled=False):
            # Affine per channel, so it commutes with the decoder's interpolation
            # (whose weights sum to one) and comes before the exact boundary values.
            y = self._unnormalised(y.to(x.dtype))
            if self.constraint is None:
                return self._decoded(y, boundary_values)
            # split, not two slices: its backward is one concatenation, where each
            # slice's fills a zero array of the whole output and adds into it
            channels = [1, y.shape[1] - 1]
            if not self.native and getattr(self.constraint, "takes_grid_basis", False):
                # The basis stays on the grid: the constraint combines its fields in
                # the grid's hats (the decoder's interpolation), and one field is
                # decoded instead of 1 + N (BENCHMARKS.md, "The basis on the grid").
                prediction, basis = y.split(channels, dim=1)
                prediction = self._decoded(prediction, boundary_values)
            else:
                prediction, basis = self._decoded(y, boundary_values).split(channels, dim=1)
            inputs = {
                name: fields[:, i]
                for i, name in enumerate(self.constraint_inputs)
                if name is not None
            }
            return self.constraint(prediction, basis, **inputs)

    def _decoded(self, y: torch.Tensor, boundary_values: torch.Tensor | None) -> FETensor:
        """The processor's outputs ``y`` (in physical units) as FE coefficients
        ``(B, C, n_dofs_out)`` with the Dirichlet values."""
        if not self.native:
            return self.decoder(y, boundary_values=boundary_values)
        if self.decoder is not None:
            y = self.decoder(y)
        if len(self.boundary_dofs):
            g = self.boundary_values if boundary_values is None else boundary_values
            y = impose_dirichlet(y, self.boundary_dofs, g)
        return y

    def transfer(
        self,
        space_in: FunctionSpace,
        space_out: FunctionSpace | None = None,
        *,
        boundary_values: BoundaryValues | None = None,
        constraint: nn.Module | None = None,
    ) -> FEOperator:
        """The same network on other meshes of the same domain, sharing its weights.

        Args:
            space_in, space_out: the new spaces (``space_out`` defaults to ``space_in``).
            boundary_values: Dirichlet data on the new output space (default zero).
            constraint: for a constrained model, the constraint on the new output
                space (its residual is the new mesh's; :func:`fenop.train.load_model`
                and the training layer rebuild it from a checkpoint's description).

        Raises:
            ValueError: a new mesh's bounding box is not this model's (the grid would
                cover another region), or, for a mesh-native processor, a new mesh does
                not cover the processor's mesh or leaves it.
        """
        space_out = space_in if space_out is None else space_out
        for new, old in ((space_in, self.space_in), (space_out, self.space_out)):
            (lo, hi), (lo0, hi0) = bounding_box(new.mesh), bounding_box(old.mesh)
            tol = 1e-9 * float(np.max(hi0 - lo0))
            if not (np.allclose(lo, lo0, atol=tol) and np.allclose(hi, hi0, atol=tol)):
                raise ValueError(
                    f"the mesh spans {lo.tolist()} to {hi.tolist()}, but the model's domain "
                    f"spans {lo0.tolist()} to {hi0.tolist()}"
                )
        if constraint is None and self.constraint is not None:
            if not space_out.same_dofs(self.space_out):
                raise ValueError(
                    "a constrained model needs a `constraint` on the new mesh (its residual "
                    "is the old mesh's)"
                )
            constraint = self.constraint
        clone = FEOperator(
            space_in,
            space_out,
            self.processor,
            resolution=self.resolution,
            input_stats=self.input_stats,
            output_stats=self.output_stats,
            boundary_values=boundary_values,
            constraint=constraint,
            constraint_inputs=self.constraint_inputs,
        )
        return clone.to(next(self.processor.parameters()).device)
