"""Label maps <-> Label Studio results, checked through the SDK's RLE decoder and pycocotools."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from label_studio_sdk.converter.brush import decode_rle
from pycocotools import mask as mask_utils

from backend.label_config import ControlSpec
from backend.results import label_map_to_results, prediction_score, results_to_label_map

BRUSH = ControlSpec("tag", "brushlabels", "image", "image", ("Cat", "Dog"))
POLY = ControlSpec("poly", "polygonlabels", "image", "image", ("Cat", "Dog"))
RECT = ControlSpec("rect", "rectanglelabels", "image", "image", ("Cat", "Dog"))

# Reference section 11.5: the 64x48 square mask[8:31, 8:31] as stored by a real Label Studio annotation.
# fmt: off
REFERENCE_SQUARE_RLE = [
    0, 0, 48, 0, 57, 27, 255, 8, 31, 0, 203, 127, 250, 140, 3, 45, 255, 234, 48, 12, 183, 255, 168, 192,
    50, 223, 254, 163, 0, 203, 127, 250, 140, 3, 45, 255, 234, 48, 12, 183, 255, 168, 192, 50, 223, 254, 163, 0,
    203, 127, 250, 140, 3, 45, 255, 234, 48, 12, 183, 255, 168, 192, 50, 223, 254, 163, 0, 203, 127, 250, 140, 3,
    45, 255, 234, 48, 12, 183, 255, 168, 192, 50, 223, 254, 163, 0, 203, 127, 250, 140, 3, 45, 255, 234, 48, 12,
    183, 255, 168, 192, 50, 223, 254, 163, 0, 203, 127, 250, 140, 3, 45, 255, 234, 48, 12, 183, 255, 196, 96, 192,
    0,
]
# fmt: on


def iou(a: np.ndarray, b: np.ndarray) -> float:
    rles = mask_utils.encode(np.asfortranarray(np.stack([a, b], axis=-1).astype(np.uint8)))
    return float(mask_utils.iou([rles[0]], [rles[1]], [0])[0, 0])


def disk(h, w, cy, cx, r):
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2


def scene():
    """Two cats (a disk and a square) and one dog (an L shape) on 120x90."""
    lm = np.zeros((90, 120), dtype=np.int32)
    lm[disk(90, 120, 25, 30, 15)] = 1
    lm[60:80, 10:35] = 1
    lm[20:70, 70:80] = 2
    lm[60:70, 80:110] = 2
    return lm


def test_reference_square_encodes_to_the_rle_label_studio_stored():
    lm = np.zeros((48, 64), dtype=np.int32)
    lm[8:31, 8:31] = 1
    (region,) = label_map_to_results(lm, None, BRUSH, min_area=1)
    assert region["value"]["rle"] == REFERENCE_SQUARE_RLE
    assert region["value"]["format"] == "rle" and region["value"]["brushlabels"] == ["Cat"]
    assert (region["original_width"], region["original_height"]) == (64, 48)


def test_brush_regions_round_trip_exactly_through_the_sdk_decoder():
    lm = scene()
    results = label_map_to_results(lm, None, BRUSH, min_area=1)
    assert sorted(r["value"]["brushlabels"][0] for r in results) == ["Cat", "Cat", "Dog"]
    rebuilt = np.zeros_like(lm)
    for r in results:
        rgba = decode_rle(r["value"]["rle"]).reshape(90, 120, 4)
        assert set(np.unique(rgba)) <= {0, 255}  # 0/255: the frontend paints non-zero alpha at full opacity
        assert (rgba == rgba[:, :, :1]).all()  # R = G = B = A
        assert not rebuilt[rgba[:, :, 3] > 0].any()  # instances do not overlap
        rebuilt[rgba[:, :, 3] > 0] = BRUSH.labels.index(r["value"]["brushlabels"][0]) + 1
    np.testing.assert_array_equal(rebuilt, lm)


def test_result_items_have_label_studio_shape_and_are_json_serialisable():
    results = label_map_to_results(scene(), np.full((3, 90, 120), 0.5, np.float32), BRUSH, min_area=1)
    for r in results:
        assert set(r) == {
            "id",
            "from_name",
            "to_name",
            "type",
            "original_width",
            "original_height",
            "image_rotation",
            "value",
            "score",
        }
        assert (r["from_name"], r["to_name"], r["type"], r["image_rotation"]) == ("tag", "image", "brushlabels", 0)
        assert isinstance(r["id"], str) and 0 < len(r["id"]) <= 12
    assert len({r["id"] for r in results}) == len(results)
    assert json.loads(json.dumps(results)) == results


def test_annotation_round_trip_for_brush():
    lm = scene()
    back = results_to_label_map(label_map_to_results(lm, None, BRUSH, min_area=1), BRUSH, 90, 120)
    assert back.dtype == np.int32
    np.testing.assert_array_equal(back, lm)


def test_polygons_follow_each_instance():
    lm = scene()
    results = label_map_to_results(lm, None, POLY, min_area=1)
    assert len(results) == 3
    for r in results:
        assert r["type"] == "polygonlabels" and r["value"]["closed"] is True
        assert all(0 <= x <= 100 and 0 <= y <= 100 for x, y in r["value"]["points"])
        drawn = results_to_label_map([r], POLY, 90, 120) > 0
        label_id = POLY.labels.index(r["value"]["polygonlabels"][0]) + 1
        best = max(iou(drawn, inst) for inst in instances(lm == label_id))
        assert best > 0.9


def instances(mask):
    import cv2

    n, cc = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    return [cc == k for k in range(1, n)]


def test_polygons_are_simplified_to_the_point_budget():
    lm = np.zeros((200, 200), dtype=np.int32)
    lm[disk(200, 200, 100, 100, 80)] = 2
    (unbounded,) = label_map_to_results(lm, None, POLY, min_area=1, polygon_max_points=10_000)
    (r,) = label_map_to_results(lm, None, POLY, min_area=1, polygon_max_points=16)
    assert len(unbounded["value"]["points"]) > 16
    assert 3 <= len(r["value"]["points"]) <= 16
    assert iou(results_to_label_map([r], POLY, 200, 200) > 0, lm > 0) > 0.95


def test_thin_instance_still_gives_a_polygon_with_area():
    lm = np.zeros((40, 40), dtype=np.int32)
    lm[5, 3:30] = 1
    (r,) = label_map_to_results(lm, None, POLY, min_area=1)
    assert len(r["value"]["points"]) >= 3
    np.testing.assert_array_equal(results_to_label_map([r], POLY, 40, 40), lm)


def test_rectangles_match_instance_boxes():
    lm = np.zeros((50, 80), dtype=np.int32)
    lm[10:20, 5:25] = 1
    lm[disk(50, 80, 30, 60, 8)] = 2
    results = label_map_to_results(lm, None, RECT, min_area=1)
    boxes = {r["value"]["rectanglelabels"][0]: r["value"] for r in results}
    assert boxes["Cat"] == {
        "x": 6.25,
        "y": 20.0,
        "width": 25.0,
        "height": 20.0,
        "rotation": 0,
        "rectanglelabels": ["Cat"],
    }
    dog = boxes["Dog"]
    assert (dog["x"] / 100 * 80, dog["y"] / 100 * 50) == pytest.approx((52, 22))
    assert (dog["width"] / 100 * 80, dog["height"] / 100 * 50) == pytest.approx((17, 17))
    back = results_to_label_map(results, RECT, 50, 80)
    np.testing.assert_array_equal(back == 1, lm == 1)
    ys, xs = np.nonzero(back == 2)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (22, 38, 52, 68)


def test_min_area_drops_small_instances():
    lm = np.zeros((40, 40), dtype=np.int32)
    lm[0:10, 0:10] = 1  # 100 px
    lm[20:27, 20:27] = 1  # 49 px
    lm[35, 35] = 2  # 1 px
    assert len(label_map_to_results(lm, None, BRUSH, min_area=50)) == 1
    assert len(label_map_to_results(lm, None, BRUSH, min_area=49)) == 2
    assert len(label_map_to_results(lm, None, BRUSH, min_area=0)) == 3


def test_diagonal_pixels_are_one_instance():
    lm = np.zeros((10, 10), dtype=np.int32)
    lm[np.arange(10), np.arange(10)] = 1
    assert len(label_map_to_results(lm, None, RECT, min_area=1)) == 1


def test_region_score_is_the_mean_of_the_label_score_over_the_region():
    lm = np.zeros((30, 30), dtype=np.int32)
    lm[0:10, 0:10] = 1
    lm[20:30, 20:30] = 1
    scores = np.zeros((3, 30, 30), dtype=np.float32)
    scores[1, 0:10, 0:5] = 1.0  # half the first instance
    scores[1, 20:30, 20:30] = 0.25
    scores[2] = 0.9  # another label's map must not leak in
    results = label_map_to_results(lm, scores, RECT, min_area=1)
    assert sorted(r["score"] for r in results) == pytest.approx([0.25, 0.5])
    assert all(type(r["score"]) is float for r in results)
    assert prediction_score(results) == pytest.approx(0.375)
    assert prediction_score([]) == 0.0


def test_empty_label_map_gives_no_regions():
    assert label_map_to_results(np.zeros((8, 8), np.int32), None, BRUSH) == []


@pytest.mark.parametrize(
    "lm, scores, message",
    [
        (np.zeros((4, 4, 1), np.int32), None, "2-D"),
        (np.zeros((4, 4), np.float32), None, "integer"),
        (np.full((4, 4), 3, np.int32), None, "0..2"),
        (np.zeros((4, 4), np.int32), np.zeros((2, 4, 4)), "scores"),
    ],
)
def test_bad_label_maps_are_refused(lm, scores, message):
    with pytest.raises(ValueError, match=message):
        label_map_to_results(lm, scores, BRUSH)


# --- annotations -> label map ------------------------------------------------------------------


def brush_item(rle, label="Cat", from_name="tag"):
    return {
        "from_name": from_name,
        "to_name": "image",
        "type": "brushlabels",
        "value": {"format": "rle", "rle": rle, "brushlabels": [label]},
    }


def test_reference_annotation_decodes_to_the_square():
    lm = results_to_label_map([brush_item(REFERENCE_SQUARE_RLE, "Dog")], BRUSH, 48, 64)
    expected = np.zeros((48, 64), np.int32)
    expected[8:31, 8:31] = 2
    np.testing.assert_array_equal(lm, expected)


def encode_like_the_frontend(values: list[int]) -> list[int]:
    """A literal-run encoder (as @thi.ng/rle-pack emits): runs of distinct values share one chunk."""
    bits = f"{len(values):032b}" + "00111" + "0010001101111111"
    i = 0
    while i < len(values):
        j = i + 1
        while j < len(values) and j - i < 8 and values[j] == values[i]:
            j += 1
        if j - i >= 2:
            bits += "1" + "00" + f"{j - i - 1:03b}" + f"{values[i]:08b}"
        else:  # literal run of up to 8 values
            j = min(i + 8, len(values))
            while j - i > 1 and values[j - 1] == values[j - 2]:
                j -= 1
            bits += "0" + "00" + f"{j - i - 1:03b}" + "".join(f"{v:08b}" for v in values[i:j])
        i = j
    bits += "0" * (-len(bits) % 8)
    return [int(bits[k : k + 8], 2) for k in range(0, len(bits), 8)]


def test_frontend_style_rle_with_literal_runs_and_soft_edges():
    alpha = np.zeros((6, 7), np.uint8)
    alpha[1:5, 2:6] = 255
    alpha[1, 2] = 100  # a faint anti-aliased edge pixel stays out
    alpha[4, 5] = 200
    rgba = np.repeat(alpha.reshape(-1), 4).tolist()
    lm = results_to_label_map([brush_item(encode_like_the_frontend(rgba))], BRUSH, 6, 7)
    expected = (alpha >= 128).astype(np.int32)
    np.testing.assert_array_equal(lm, expected)


def test_reference_polygon_annotation():
    item = {
        "from_name": "poly",
        "to_name": "image",
        "type": "polygonlabels",
        "value": {
            "points": [[12.5, 16.7], [46.9, 16.7], [46.9, 62.5], [12.5, 62.5]],
            "closed": True,
            "polygonlabels": ["Dog"],
        },
    }
    lm = results_to_label_map([item], POLY, 48, 64)
    ys, xs = np.nonzero(lm)
    assert set(np.unique(lm)) == {0, 2}
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (8, 30, 8, 30)


@pytest.mark.parametrize(
    "rotation, rows, cols",
    [(90, (10, 30), (30, 40)), (180, (0, 10), (20, 40)), (270, (0, 10), (40, 50)), (-90, (0, 10), (40, 50))],
)
def test_rectangles_rotated_by_right_angles_are_exact(rotation, rows, cols):
    # A 20x10 px box at (40, 10) rotated clockwise around its top-left corner.
    item = {
        "from_name": "rect",
        "type": "rectanglelabels",
        "value": {
            "x": 40.0,
            "y": 10.0,
            "width": 20.0,
            "height": 10.0,
            "rotation": rotation,
            "rectanglelabels": ["Cat"],
        },
    }
    expected = np.zeros((100, 100), np.int32)
    expected[rows[0] : rows[1], cols[0] : cols[1]] = 1
    np.testing.assert_array_equal(results_to_label_map([item], RECT, 100, 100), expected)


def test_rectangle_rotated_by_45_degrees():
    item = {
        "from_name": "rect",
        "type": "rectanglelabels",
        "value": {"x": 50.0, "y": 10.0, "width": 40.0, "height": 40.0, "rotation": 45, "rectanglelabels": ["Dog"]},
    }
    lm = results_to_label_map([item], RECT, 100, 100)
    # The square's centre lies below its top-left corner at (50, 10 + 40 * sqrt(2) / 2).
    yy, xx = np.mgrid[:100, :100] + 0.5
    u = ((xx - 50) + (yy - 10)) / np.sqrt(2)  # coordinate along the rotated top edge
    v = (-(xx - 50) + (yy - 10)) / np.sqrt(2)  # coordinate along the rotated left edge
    expected = (u >= 0) & (u < 40) & (v >= 0) & (v < 40)
    assert set(np.unique(lm)) == {0, 2}
    assert iou(lm > 0, expected) > 0.95


def test_other_controls_and_unlabelled_regions_are_ignored_and_later_regions_win():
    square = np.zeros((48, 64), np.int32)
    square[8:31, 8:31] = 1
    items = [
        brush_item(REFERENCE_SQUARE_RLE, "Unknown-but-ignored", from_name="other"),
        {"from_name": "kp", "type": "keypointlabels", "value": {"x": 1, "y": 1, "keypointlabels": ["Cat"]}},
        brush_item(REFERENCE_SQUARE_RLE, "Cat"),
        {"from_name": "tag", "type": "brushlabels", "value": {"format": "rle", "rle": [], "brushlabels": []}},
        {
            "from_name": "tag",
            "type": "brushlabels",
            "value": {
                "format": "rle",
                "rle": label_map_to_results(
                    np.pad(np.ones((5, 5), np.int32), ((0, 43), (0, 59))), None, BRUSH, min_area=1
                )[0]["value"]["rle"],
                "brushlabels": ["Dog"],
            },
        },
    ]
    lm = results_to_label_map(items, BRUSH, 48, 64)
    expected = square.copy()
    expected[0:5, 0:5] = 2
    np.testing.assert_array_equal(lm, expected)


@pytest.mark.parametrize(
    "item, message",
    [
        (brush_item(REFERENCE_SQUARE_RLE, "Horse"), "'Horse'"),
        (brush_item(REFERENCE_SQUARE_RLE[:40]), "corrupt"),
        (brush_item([0, 0, 0, 16, 57, 27, 252, 127, 246, 192, 0]), "12288"),
        (brush_item([0, 0, 48, 0, 57, 27, 999, 8]), "byte values"),
        (brush_item("not a list"), "byte values"),
        (brush_item(None), "byte values"),
        (
            {"from_name": "tag", "type": "brushlabels", "value": {"format": "png", "rle": [], "brushlabels": ["Cat"]}},
            "format",
        ),
        ({"from_name": "tag", "type": "labels", "value": {"labels": ["Cat"]}}, "unsupported type"),
        (
            {
                "from_name": "tag",
                "type": "polygonlabels",
                "value": {"points": [[1, 2], [3, 4]], "polygonlabels": ["Cat"]},
            },
            "three",
        ),
        (
            {
                "from_name": "tag",
                "type": "rectanglelabels",
                "value": {"x": "a", "y": 0, "width": 1, "height": 1, "rectanglelabels": ["Cat"]},
            },
            "numbers",
        ),
        (
            {
                "from_name": "tag",
                "type": "rectanglelabels",
                "value": {"x": 0, "y": 0, "width": float("nan"), "height": 1, "rectanglelabels": ["Cat"]},
            },
            "finite",
        ),
        (
            {
                "from_name": "tag",
                "type": "polygonlabels",
                "value": {"points": [[0, 0], [1e12, 0], [0, 5]], "polygonlabels": ["Cat"]},
            },
            "far outside",
        ),
    ],
)
def test_bad_annotations_raise_value_error(item, message):
    with pytest.raises(ValueError, match=message):
        results_to_label_map([item], BRUSH, 48, 64)


@settings(max_examples=30, deadline=None)
@given(st.data())
def test_brush_round_trip_property(data):
    h = data.draw(st.integers(1, 24))
    w = data.draw(st.integers(1, 24))
    cells = data.draw(st.lists(st.integers(0, 2), min_size=h * w, max_size=h * w))
    lm = np.array(cells, dtype=np.int32).reshape(h, w)
    back = results_to_label_map(label_map_to_results(lm, None, BRUSH, min_area=1), BRUSH, h, w)
    np.testing.assert_array_equal(back, lm)
