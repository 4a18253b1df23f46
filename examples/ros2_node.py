"""A ROS 2 node that answers a question about the camera stream: subscribes to ``sensor_msgs/Image``, asks the
model about every N-th frame (dropping frames while it is busy), publishes each answer as ``std_msgs/String``.

UNTESTED: written against the rclpy API (Humble / Jazzy) but never run — ROS 2 is not installed on the machines
that build edgelvm. The model side (Engine, submit, Job) is the same as in ``examples/camera_loop.py``, which runs
in CI's environment.

    python3 examples/ros2_node.py --ros-args -p bundle:=/opt/bundles/llava -p question:="Is the door open?" \\
        -p every_n:=15 -r image:=/camera/color/image_raw -r answer:=/vlm/answer

Parameters: ``bundle`` (required), ``question``, ``every_n`` (default 15), ``max_tokens`` (32), ``timeout_s``
(10.0), ``threads`` (0 = onnxruntime's choice). Topics: ``image`` (in), ``answer`` (out); remap them as above.

Threading: the image callback only copies the frame and submits it (no model code runs in the executor); a
timer on the executor publishes finished answers, so the publisher is only used from the executor's thread.
"""

from __future__ import annotations

import time

import numpy as np
import rclpy
from rclpy.node import Node
from sensor_msgs.msg import Image
from std_msgs.msg import String

from edgelvm.runtime import VLM
from edgelvm.runtime.engine import BusyError, Engine, Job

#: ROS image encodings this node converts to RGB (channels, reorder to RGB).
_ENCODINGS = {
    "rgb8": (3, None),
    "bgr8": (3, [2, 1, 0]),
    "rgba8": (4, [0, 1, 2]),
    "bgra8": (4, [2, 1, 0]),
    "mono8": (1, None),
}


def image_to_rgb(msg: Image) -> np.ndarray:
    """``sensor_msgs/Image`` → ``HxWx3`` (or ``HxW`` for mono8) uint8 RGB array, honouring the row stride."""
    if msg.encoding not in _ENCODINGS:
        raise ValueError(f"unsupported image encoding {msg.encoding!r}; use one of {sorted(_ENCODINGS)}")
    channels, order = _ENCODINGS[msg.encoding]
    rows = np.frombuffer(msg.data, dtype=np.uint8).reshape(msg.height, msg.step)
    pixels = rows[:, : msg.width * channels].reshape(msg.height, msg.width, channels)
    if channels == 1:
        return pixels[..., 0].copy()
    return np.ascontiguousarray(pixels[..., order] if order else pixels)


class VlmAnswerNode(Node):
    """Image in, answer out; at most one question in flight."""

    def __init__(self) -> None:
        super().__init__("edgelvm_vlm")
        bundle = self.declare_parameter("bundle", "").value
        if not bundle:
            raise SystemExit("set the 'bundle' parameter: --ros-args -p bundle:=/path/to/bundle")
        self.question = self.declare_parameter("question", "What is in front of the robot?").value
        self.every_n = max(1, int(self.declare_parameter("every_n", 15).value))
        self.max_tokens = int(self.declare_parameter("max_tokens", 32).value)
        self.timeout_s = float(self.declare_parameter("timeout_s", 10.0).value)
        threads = int(self.declare_parameter("threads", 0).value) or None

        self.engine = Engine(VLM.load(bundle, threads=threads), max_queue=1)
        self.publisher = self.create_publisher(String, "answer", 10)
        self.subscription = self.create_subscription(Image, "image", self.on_image, 2)  # depth 2: keep it fresh
        self.timer = self.create_timer(0.02, self.publish_finished)
        self.frames = 0
        self.dropped = 0
        self.job: Job | None = None
        self.submitted = 0.0
        self.get_logger().info(f"answering {self.question!r} every {self.every_n} frames with {bundle}")

    def on_image(self, msg: Image) -> None:
        self.frames += 1
        if self.frames % self.every_n:
            return
        if self.job is not None:  # still answering an older frame: drop this one rather than queue behind it
            self.dropped += 1
            return
        try:
            frame = image_to_rgb(msg)
            self.submitted = time.perf_counter()
            self.job = self.engine.submit(frame, self.question, max_new_tokens=self.max_tokens, timeout=self.timeout_s)
        except BusyError:
            self.dropped += 1
        except Exception as err:  # a bad frame must not kill the node
            self.get_logger().warning(f"frame {self.frames} skipped: {err}")

    def publish_finished(self) -> None:
        job = self.job
        if job is None or not job.done:
            return
        self.job = None
        latency_ms = (time.perf_counter() - self.submitted) * 1e3
        try:
            answer = job.result()
        except Exception as err:
            self.get_logger().warning(f"answer failed: {err}")
            return
        self.publisher.publish(String(data=answer))
        self.get_logger().info(
            f"{latency_ms:.0f} ms ({job.finish_reason}, {self.dropped} frames dropped so far): {answer!r}"
        )

    def destroy_node(self) -> None:
        self.engine.close(wait=False)
        super().destroy_node()


def main() -> None:
    rclpy.init()
    node = VlmAnswerNode()
    try:
        rclpy.spin(node)
    except KeyboardInterrupt:
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    main()
