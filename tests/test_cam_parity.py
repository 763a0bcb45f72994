"""jaxcam.cam against pytorch-grad-cam 1.5.7 itself, on the same weights and images.

Skipped where pytorch-grad-cam or torch is not installed (.ci/run installs both).
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from bench.common import import_pytorch_grad_cam  # noqa: E402
from bench.torch_resnet import ResNet18 as TorchResNet18  # noqa: E402
from jaxcam import cam, models  # noqa: E402

grad_cam = import_pytorch_grad_cam()
if grad_cam is None:
    pytest.skip("pytorch-grad-cam is not installed", allow_module_level=True)
from pytorch_grad_cam.utils.image import scale_cam_image  # noqa: E402
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402
from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection  # noqa: E402

CLASSES = {"gradcam": "GradCAM", "gradcam++": "GradCAMPlusPlus", "hirescam": "HiResCAM", "xgradcam": "XGradCAM",
           "layercam": "LayerCAM", "scorecam": "ScoreCAM"}


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    reference = TorchResNet18(width=8)
    with torch.no_grad():
        for module in reference.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.3, 0.3)
                module.running_var.uniform_(0.5, 2.0)
    reference.eval()
    variables = models.from_torch_state_dict(reference.state_dict(), width=8)
    images = np.random.default_rng(1).normal(size=(3, 32, 32, 3)).astype(np.float32)
    return reference, models.ResNet18(width=8), variables, images


def reference_cams(reference, images, method, layer_names, targets):
    layers = [getattr(reference, name)[-1] for name in layer_names]
    tensor = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    with getattr(grad_cam, CLASSES[method])(model=reference, target_layers=layers) as extractor:
        return extractor(input_tensor=tensor, targets=[ClassifierOutputTarget(int(t)) for t in targets])


@pytest.mark.parametrize("method", list(CLASSES))
@pytest.mark.parametrize("layers", [("layer3",), ("layer2", "layer3")])
def test_matches_pytorch_grad_cam(pair, method, layers):
    reference, model, variables, images = pair
    targets = np.array([3, 7, 0])
    expected = reference_cams(reference, images, method, layers, targets)
    got = cam.compute(model, variables, images, layer=list(layers), targets=targets, method=method)
    np.testing.assert_allclose(got, expected, atol=5e-5)


def test_eigencam_matches_up_to_our_sign_rule(pair):
    reference, model, variables, images = pair
    _, _, acts, _ = cam.activations_and_gradients(model, variables, images, np.full(3, -1, np.int32), ("layer3",))
    activations = np.asarray(acts["layer3"]).transpose(0, 3, 1, 2)
    projection = get_2d_projection(activations)
    # pytorch-grad-cam leaves the SVD sign to LAPACK; jaxcam orients it along the summed activations.
    summed = activations.sum(1)
    summed = summed - summed.mean(axis=(1, 2), keepdims=True)
    signs = np.where((projection * summed).sum(axis=(1, 2)) < 0, -1.0, 1.0)
    expected = scale_cam_image(scale_cam_image(np.maximum(projection * signs[:, None, None], 0), (32, 32)))
    got = cam.compute(model, variables, images, layer="layer3", method="eigencam")
    np.testing.assert_allclose(got, expected, atol=5e-5)


def test_predicted_class_default_matches(pair):
    reference, model, variables, images = pair
    tensor = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    with grad_cam.GradCAM(model=reference, target_layers=[reference.layer2[-1]]) as extractor:
        expected = extractor(input_tensor=tensor, targets=None)
    np.testing.assert_allclose(cam.compute(model, variables, images, layer="layer2"), expected, atol=5e-5)
