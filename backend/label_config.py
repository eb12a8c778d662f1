"""Which parts of a Label Studio label config the backend can serve.

SegGPT produces one label map per image, so a servable control is a labels tag
(brush, polygon or rectangle) attached to a single ``<Image value="$key">``;
label ids in label maps are 1-based positions in the control's label list.
"""

from __future__ import annotations

from dataclasses import dataclass

from label_studio_sdk.label_interface import LabelInterface

SUPPORTED_KINDS = ("brushlabels", "polygonlabels", "rectanglelabels")
MAX_LABELS = 32  # label maps and palettes are sized for at most this many classes


@dataclass(frozen=True)
class ControlSpec:
    """A control the backend predicts for: ``labels[i - 1]`` is label id ``i``."""

    name: str
    kind: str
    to_name: str
    value_key: str
    labels: tuple[str, ...]


def parse_label_config(xml: str) -> list[ControlSpec]:
    """Return the servable controls of ``xml`` in config order.

    Controls of other kinds (Choices, TextArea, KeyPointLabels, ...) are ignored; a
    servable kind that is wired wrongly, or a config with nothing servable, raises
    ``ValueError`` naming the problem, so a broken project fails loudly at setup.
    """
    if not isinstance(xml, str) or not xml.strip():
        raise ValueError("label config is empty")
    try:
        interface = LabelInterface(xml)
    except Exception as exc:  # the SDK raises its own, non-ValueError, syntax errors
        raise ValueError(f"label config is not valid XML: {exc}") from None

    specs = [
        _control_spec(interface, control) for control in interface.controls if control.tag.lower() in SUPPORTED_KINDS
    ]
    if not specs:
        found = sorted({control.tag for control in interface.controls}) or ["none"]
        raise ValueError(
            "label config has no BrushLabels, PolygonLabels or RectangleLabels control "
            f"attached to an Image (control tags found: {', '.join(found)})"
        )
    return specs


def _control_spec(interface: LabelInterface, control) -> ControlSpec:
    where = f"{control.tag} {control.name!r}"
    if len(control.to_name) != 1:
        raise ValueError(f"{where} must point to exactly one Image (toName={','.join(control.to_name)!r})")
    to_name = control.to_name[0]
    try:
        image = interface.get_object(to_name)
    except Exception:
        raise ValueError(f"{where} points to {to_name!r}, which is not a tag in the config") from None
    if image.tag.lower() != "image":
        raise ValueError(f"{where} points to a {image.tag} tag; only Image is supported")
    if "valueList" in image.attr:
        raise ValueError(f"Image {to_name!r} uses valueList (multi-image tasks are not supported)")
    value = image.attr.get("value") or ""
    if not value.startswith("$") or len(value) < 2:
        raise ValueError(f'Image {to_name!r} must take its URL from task data, like value="$image"')
    labels = tuple(control.labels)
    if not labels:
        raise ValueError(f"{where} has no <Label> values")
    if len(labels) > MAX_LABELS:
        raise ValueError(f"{where} has {len(labels)} labels; at most {MAX_LABELS} are supported")
    return ControlSpec(control.name, control.tag.lower(), to_name, value[1:], labels)
