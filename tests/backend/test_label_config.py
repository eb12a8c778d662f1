"""parse_label_config on the reference configs and on configs it must refuse."""

import pytest

from backend.label_config import MAX_LABELS, ControlSpec, parse_label_config


def config(image: str, control: str) -> str:
    return f"<View>{image}{control}</View>"


IMAGE = '<Image name="i" value="$img"/>'
BRUSH_A = '<BrushLabels name="t" toName="i"><Label value="a"/></BrushLabels>'

# Section 10.5 of the Label Studio reference.
BRUSH_CONFIG = """
<View>
  <Image name="image" value="$image" zoom="true"/>
  <BrushLabels name="tag" toName="image">
    <Label value="Cat" background="red"/><Label value="Dog" background="blue"/>
  </BrushLabels>
</View>
"""
POLYGON_CONFIG = """
<View>
  <Image name="image" value="$image"/>
  <PolygonLabels name="poly" toName="image" strokeWidth="3" pointSize="small">
    <Label value="Cat" background="red"/><Label value="Dog" background="blue"/>
  </PolygonLabels>
</View>
"""


def test_brush_config_from_reference():
    assert parse_label_config(BRUSH_CONFIG) == [
        ControlSpec(name="tag", kind="brushlabels", to_name="image", value_key="image", labels=("Cat", "Dog"))
    ]


def test_polygon_config_from_reference():
    (spec,) = parse_label_config(POLYGON_CONFIG)
    assert (spec.name, spec.kind, spec.labels) == ("poly", "polygonlabels", ("Cat", "Dog"))


def test_several_controls_on_one_image_keep_config_order_and_skip_other_kinds():
    xml = """
    <View>
      <Image name="img" value="$photo"/>
      <Choices name="quality" toName="img"><Choice value="ok"/></Choices>
      <RectangleLabels name="box" toName="img"><Label value="Car"/></RectangleLabels>
      <KeyPointLabels name="kp" toName="img"><Label value="Eye"/></KeyPointLabels>
      <BrushLabels name="mask" toName="img"><Label value="Road"/><Label value="Sky" alias="sky"/></BrushLabels>
      <TextArea name="note" toName="img"/>
    </View>
    """
    specs = parse_label_config(xml)
    assert [(s.name, s.kind, s.value_key, s.labels) for s in specs] == [
        ("box", "rectanglelabels", "photo", ("Car",)),
        ("mask", "brushlabels", "photo", ("Road", "sky")),
    ]


def test_controls_on_two_images():
    xml = """
    <View>
      <Image name="left" value="$a"/><Image name="right" value="$b"/>
      <BrushLabels name="l" toName="left"><Label value="X"/></BrushLabels>
      <PolygonLabels name="r" toName="right"><Label value="Y"/></PolygonLabels>
    </View>
    """
    specs = parse_label_config(xml)
    assert [(s.to_name, s.value_key) for s in specs] == [("left", "a"), ("right", "b")]


def test_labels_nested_in_views_are_found():
    xml = """
    <View><Image name="i" value="$img"/>
      <BrushLabels name="t" toName="i"><View><Label value="A"/></View><Label value="B"/></BrushLabels>
    </View>
    """
    assert parse_label_config(xml)[0].labels == ("A", "B")


def test_exactly_max_labels_is_accepted():
    labels = "".join(f'<Label value="c{i}"/>' for i in range(MAX_LABELS))
    xml = f'<View><Image name="i" value="$img"/><BrushLabels name="t" toName="i">{labels}</BrushLabels></View>'
    assert len(parse_label_config(xml)[0].labels) == MAX_LABELS


@pytest.mark.parametrize(
    "xml, message",
    [
        ("", "empty"),
        ('<View><Image name="i" value="$img"', "not valid XML"),
        ("not xml at all", "not valid XML"),
        (
            '<View><Text name="t" value="$text"/><Choices name="c" toName="t"><Choice value="a"/></Choices></View>',
            "Choices",
        ),
        (
            config(IMAGE, '<KeyPointLabels name="k" toName="i"><Label value="a"/></KeyPointLabels>'),
            "KeyPointLabels",
        ),
        ('<View><Image name="i" value="$img"/><BrushLabels name="t" toName="i"></BrushLabels></View>', "no <Label>"),
        (
            config('<Text name="i" value="$txt"/>', BRUSH_A),
            "Text",
        ),
        ('<View><BrushLabels name="t" toName="i"><Label value="a"/></BrushLabels></View>', "'i'"),
        (
            config('<Image name="i" valueList="$imgs"/>', BRUSH_A),
            "valueList",
        ),
        (
            config('<Image name="i" value="http://x/a.png"/>', BRUSH_A),
            "task data",
        ),
        (
            '<View><Image name="i" value="$a"/><Image name="j" value="$b"/>'
            '<BrushLabels name="t" toName="i,j"><Label value="a"/></BrushLabels></View>',
            "exactly one Image",
        ),
    ],
)
def test_unservable_configs_raise_value_error(xml, message):
    with pytest.raises(ValueError, match=message):
        parse_label_config(xml)


def test_too_many_labels():
    labels = "".join(f'<Label value="c{i}"/>' for i in range(MAX_LABELS + 1))
    xml = f'<View><Image name="i" value="$img"/><BrushLabels name="t" toName="i">{labels}</BrushLabels></View>'
    with pytest.raises(ValueError, match=f"{MAX_LABELS + 1} labels"):
        parse_label_config(xml)


def test_external_entities_are_not_resolved(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("$stolen")
    xml = (
        f'<!DOCTYPE v [<!ENTITY e SYSTEM "file://{secret}">]>'
        '<View><Image name="i" value="&e;"/><BrushLabels name="t" toName="i"><Label value="a"/></BrushLabels></View>'
    )
    with pytest.raises(ValueError):
        parse_label_config(xml)
