"""How the masking check hides a region (core/evidence/fills.py)."""
import numpy as np
import pytest
from PIL import Image, ImageFilter

from ravl_pipeline.config import MASK_FILLS
from ravl_pipeline.core.evidence import fills


def test_box_pixel_mask_integer_and_fractional_boxes():
    m = fills.box_pixel_mask(56, 56, [[28, 0, 56, 28]])
    expected = np.zeros((56, 56), bool)
    expected[0:28, 28:56] = True
    np.testing.assert_array_equal(m, expected)
    # pixel centres (c + .5, r + .5) inside [0.4, 2.5) x [0.6, 2.4): cols 0, 1 and row 1
    m = fills.box_pixel_mask(4, 4, [[0.4, 0.6, 2.5, 2.4]])
    assert np.argwhere(m).tolist() == [[1, 0], [1, 1]]
    with pytest.raises(ValueError, match="empty or inverted"):
        fills.box_pixel_mask(4, 4, [[2, 2, 2, 3]])


def _image_without(colour, seed=0):
    """Random RGB image in which no channel value equals ``colour``'s (so any
    filled pixel visibly changes)."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, size=(56, 56, 3)).astype(np.uint8)
    for ch in range(3):
        plane = img[:, :, ch]
        plane[plane == colour[ch]] = np.uint8((int(colour[ch]) + 1) % 256)
    return img


@pytest.mark.parametrize("fill", ["mean", "black"])
def test_masking_changes_exactly_the_masked_pixels(fill):
    colour = fills.fill_colour() if fill == "mean" else np.zeros(3, np.uint8)
    img = _image_without(colour)
    boxes = [[0, 0, 28, 28], [28, 28, 56, 56]]
    out = fills.mask_regions(img, boxes, fill)
    changed = (out != img).any(axis=2)
    np.testing.assert_array_equal(changed, fills.box_pixel_mask(56, 56, boxes))
    assert (out[changed] == colour).all()
    assert out.dtype == np.uint8 and img is not out


def test_mean_fill_is_the_normalisation_mean():
    # the OpenAI CLIP mean * 255, rounded: a zero tensor after normalisation
    assert fills.fill_colour().tolist() == [123, 117, 104]
    assert fills.fill_colour({"mean": [0.5, 0.5, 0.5]}).tolist() == [128, 128, 128]


def test_blur_only_touches_the_box():
    img = _image_without([0, 0, 0], seed=1)
    out = fills.mask_regions(img, [[10, 10, 30, 40]], "blur", blur_radius=3)
    inside = fills.box_pixel_mask(56, 56, [[10, 10, 30, 40]])
    np.testing.assert_array_equal(out[~inside], img[~inside])
    blurred = np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(3)))
    np.testing.assert_array_equal(out[inside], blurred[inside])
    assert (out[inside] != img[inside]).any()


def test_mask_regions_rejects_bad_input():
    img = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="unknown mask fill 'grey'"):
        fills.mask_regions(img, [[0, 0, 4, 4]], "grey")
    with pytest.raises(ValueError, match="uint8"):
        fills.mask_regions(img.astype(np.float32), [[0, 0, 4, 4]], "black")




def test_border_fill_is_the_images_background_colour():
    img = np.full((20, 30, 3), 7, np.uint8)  # a dark background ...
    img[5:15, 5:25] = 200  # ... with an object in the middle
    img[0, :4] = 250  # a few odd border pixels do not move the median
    out = fills.mask_regions(img, [[5, 5, 25, 15]], "border")
    assert (out[5:15, 5:25] == 7).all()
    inside = fills.box_pixel_mask(20, 30, [[5, 5, 25, 15]])
    np.testing.assert_array_equal(out[~inside], img[~inside])


def test_local_fill_takes_the_colour_around_each_box():
    img = np.zeros((40, 40, 3), np.uint8)
    img[:, :20] = (10, 20, 30)  # left half one colour, right half another
    img[:, 20:] = (200, 100, 50)
    img[4:10, 4:10] = 255  # an object on the left, one on the right
    img[30:36, 30:36] = 255
    out = fills.mask_regions(img, [[4, 4, 10, 10], [30, 30, 36, 36]], "local")
    assert (out[4:10, 4:10] == (10, 20, 30)).all()
    assert (out[30:36, 30:36] == (200, 100, 50)).all()
    inside = fills.box_pixel_mask(40, 40, [[4, 4, 10, 10], [30, 30, 36, 36]])
    np.testing.assert_array_equal(out[~inside], img[~inside])
    # a box covering the whole image has no surroundings: the border colour is all there is
    whole = fills.mask_regions(img, [[0, 0, 40, 40]], "local")
    assert (whole == fills.border_colour(img)).all()


@pytest.mark.parametrize("fill", MASK_FILLS)
def test_every_configured_fill_hides_exactly_its_boxes(fill):
    img = _image_without([0, 0, 0], seed=2)
    boxes = [[3, 4, 20, 30], [30, 30, 50, 52]]
    out = fills.mask_regions(img, boxes, fill)
    inside = fills.box_pixel_mask(56, 56, boxes)
    np.testing.assert_array_equal(out[~inside], img[~inside])
    assert (out[inside] != img[inside]).any()
