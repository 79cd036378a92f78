"""``DistillSensitivityHook``: post-training weight quantization in mmdet.

The hook runs in ``before_test``, after the Runner has loaded the checkpoint
and before mmdet's test loop evaluates with the config's ``CocoMetric``. It
only orchestrates: its config keys become one
:class:`~mmdet_hawq.api.QuantSettings` (checked when the hook is built), it
checks the model and the data files, then
:func:`~mmdet_hawq.engine.run.quantize_in_runner` builds the calibration set
once, calls :func:`~mmdet_hawq.api.quantize` and writes the outputs to
``<work_dir>/<out_subdir>/`` (:func:`~mmdet_hawq.report.write_run`).

An unexpected exception in an entry point becomes a
:class:`~mmdet_hawq.errors.HawqInternalError` that names where it was raised
(mmengine's ``call_hook`` would hide a ``TypeError``'s traceback).
"""
import os.path as osp
from typing import Any

from mmengine.hooks import Hook

from mmdet.registry import HOOKS
from ...api import QuantSettings
from ...errors import report_internal_errors
from ...models import detector_family
from ..calibration import check_images
from ..checkpoint import prepare_state_dict
from ..run import check_run, quantize_in_runner, unwrap


#: The hook's own arguments; every other key of its config is a field of
#: :class:`~mmdet_hawq.api.QuantSettings`.
OWN_ARGS = ('save_packed', 'out_subdir')
#: The keys of a hook config that are not settings (mmengine's too).
HOOK_ARGS = ('type', 'priority') + OWN_ARGS


@HOOKS.register_module()
class DistillSensitivityHook(Hook):
    """Quantize the model's weights before the test loop.

    Args:
        save_packed (bool): Also save a packed low-bit checkpoint.
            Defaults to True.
        out_subdir (str): Folder under the work dir for the outputs.
            Defaults to 'hawq'.
        **settings: The fields of :class:`~mmdet_hawq.api.QuantSettings`
            (``metric``, ``target_bits``, ...; ``calibration``,
            ``sensitivity``, ``gptq`` and ``activations`` as dicts of their
            typed settings' fields). An unknown name stops with one line
            naming the closest valid one.
    """

    priority = 'LOW'

    def __init__(self, save_packed: bool = True, out_subdir: str = 'hawq',
                 **settings: Any) -> None:
        self.settings = QuantSettings.from_kwargs(
            settings, 'DistillSensitivityHook', OWN_ARGS)
        self.save_packed = save_packed
        self.out_subdir = out_subdir

    @report_internal_errors
    def before_run(self, runner) -> None:
        """Stop an unsupported detector before the checkpoint is loaded."""
        detector_family(unwrap(runner.model))

    @report_internal_errors
    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        """Make the Runner's checkpoint load strict, before it loads (an
        official facebookresearch/detr checkpoint is converted in place)."""
        prepare_state_dict(unwrap(runner.model), checkpoint,
                           runner.cfg.get('load_from'))

    @report_internal_errors
    def before_test(self, runner) -> None:
        """Quantize ``runner.model`` in place and write the outputs; every
        check comes first, and the warnings logged meanwhile are repeated
        in the summary."""
        model, cfg, s = unwrap(runner.model), runner.cfg, self.settings
        check_run(s, model, cfg)
        test_set = runner.test_dataloader.dataset
        check_images(test_set, range(min(1, len(test_set))), 'test split')
        quantize_in_runner(runner, s,
                           osp.join(runner.work_dir, self.out_subdir),
                           self.save_packed)
