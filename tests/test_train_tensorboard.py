"""The training run's TensorBoard events, read back without TensorFlow (TFRecord framing + tensorboardX protos)."""

import struct

from tensorboardX.proto import event_pb2


def read_events(path):
    data = path.read_bytes()
    events, offset = [], 0
    while offset < len(data):
        (length,) = struct.unpack("<Q", data[offset : offset + 8])
        payload = data[offset + 12 : offset + 12 + length]  # skip the length's CRC
        events.append(event_pb2.Event.FromString(payload))
        offset += 12 + length + 4  # and the payload's CRC
    return events


def test_scalars_each_epoch_and_a_cam_image(smoke_run):
    (events_file,) = (smoke_run / "tensorboard").glob("events.out.tfevents.*")
    scalars, images = {}, {}
    for event in read_events(events_file):
        for value in event.summary.value:
            if value.HasField("image"):
                images[value.tag] = (event.step, value.image)
            else:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    for tag in ("train_loss", "train_acc", "test_loss", "test_acc", "lr"):
        assert [step for step, _ in scalars[tag]] == [1, 2], tag
    step, image = images["gradcam/layer3"]
    assert step == 2 and image.width == 8 * 32 and image.height == 2 * 32
    assert image.encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n"
