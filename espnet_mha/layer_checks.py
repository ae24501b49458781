"""What the layer checks against itself: inputs against the parameters' feature size,
dtype and device, and options set on a built layer, read as the constructor reads them.

A mixin of :class:`espnet_mha.layer.FlashMultiHeadedAttention`, first in its bases (its
``__setattr__`` runs before :class:`espnet_mha.parameters.ParameterLayout`'s and
``nn.Module``'s); the checks themselves are pure functions in :mod:`espnet_mha.checks`.
"""

import torch

from espnet_mha import checks, compile_policy, dispatch, quantized


class LayerChecks:
    """Mixin for :class:`espnet_mha.layer.FlashMultiHeadedAttention` (needs the layer's
    ``n_feat``, ``causal``, ``compile_setting``, ``compile_mode``, ``_qkv_plain`` and
    ``linear_out``)."""

    # Set on a built layer, these are read as the constructor reads them (a string "false" was
    # true), and the sizes stay what the parameters were made for (an audit).
    _FLAG_OPTIONS = ("causal", "keep_attn", "transposed")
    _SIZES = ("n_feat", "h", "d_k", "d_model", "d_output")

    def __setattr__(self, name, value):
        if name in self._FLAG_OPTIONS:
            value = checks.check_flag(name, value)
        elif name == "backend":
            # Checked as the constructor checks it (None is "auto"); the environment variable
            # is read when a layer is built, so setting a built layer's backend overrides it.
            value = dispatch.check_backend(value)
        elif name in ("compile_setting", "compile_mode") and name in self.__dict__:
            # The constructor's compile and compile_mode, checked as it checks them (a probe: a
            # bad mode was taken here); as for backend, the environment was read at construction.
            setting, mode = (value, self.compile_mode) if name == "compile_setting" else (self.compile_setting, value)
            value = compile_policy.resolve_compile(setting, mode, environment=False)[name == "compile_mode"]
        elif name == "compile":
            # Assigned, it hid nn.Module.compile and changed nothing (a probe).
            raise AttributeError(f"compile is nn.Module.compile; the layer's compile option is compile_setting "
                                 f"(True, False or 'auto'), got compile = {value!r}")
        elif name in self._SIZES:
            # d_model and d_output are SequenceModule properties, kept in _d_model and _d_output.
            current = self.__dict__.get(name, self.__dict__.get(f"_{name}"))
            if current is not None and value != current:
                raise AttributeError(f"{name} is {current}, fixed by the parameters this layer was built "
                                     f"with; got {value!r}: build a new layer for other sizes")
        super().__setattr__(name, value)

    def _check_features(self, name, x, ndim, layout, feature_dim=-1):
        weight = self._modules["linear_out"]._parameters.get("weight")
        if weight is None or not self._qkv_plain():
            weight = quantized.projections(self).reference
        checks.check_features(name, x, ndim, layout, n_feat=self.n_feat, weight=weight, feature_dim=feature_dim)

    def _frames(self, memory, batch):
        """:func:`checks.one_frame` of ``memory`` for a query batch of ``batch``. A 2-D memory
        is checked here, where it is read: its feature size first (so an error names the
        shape given, not the one read), then whether the stock view could read it. A causal
        layer ignores the memory, whatever it is."""
        if self.causal or not (isinstance(memory, torch.Tensor) and memory.dim() == 2
                               and memory.layout == torch.strided):
            return checks.one_frame(memory, batch)
        self._check_features("memory", memory, 2, "(N, D)")
        memory = checks.one_frame(memory, batch)
        checks.check_read_as_frames("memory", memory, batch)  # one the stock view cannot read stays 2-D
        return memory

    def _check_memory(self, query, memory):
        # Device and dtype: both tensors were checked against the parameters; a 2-D memory
        # was read (or refused) by _frames, which every caller runs first.
        self._check_features("memory", memory, 3, "(B, T2, D)")
        checks.check_same_batch(query, memory)
