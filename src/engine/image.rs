//! Pixels in and out: tensors ↔ RGB images ↔ PNG/JPEG bytes, previews, time-lapse GIFs, and
//! images read from files or uploads (bounded, with clear errors).

use std::io::Cursor;

use candle_core::{DType, Device, Result, Tensor};
use image::codecs::gif::{GifEncoder, Repeat};
use image::codecs::jpeg::JpegEncoder;
use image::imageops::FilterType;
use image::{DynamicImage, Frame, ImageFormat, RgbImage, RgbaImage};

/// Largest decoded image accepted (pixels), so a hostile upload cannot exhaust memory.
pub(crate) const MAX_INPUT_PIXELS: u64 = 64 * 1024 * 1024;

/// Longest side of an input image. Resizing allocates `width × new height` (or the transpose)
/// floats, so a long thin image within the pixel count (67108864×1) would otherwise ask for
/// hundreds of GiB when it is resized.
pub(crate) const MAX_INPUT_SIDE: u32 = 8192;

/// Most one side of an input image may exceed the other (a 32:1 strip is already no picture).
pub(crate) const MAX_INPUT_ASPECT: u32 = 32;

/// Most bytes an input image file may have (Discord's largest upload is 500 MiB for boosted
/// servers; a picture that large is not a sensible prompt).
pub(crate) const MAX_INPUT_FILE_BYTES: u64 = 64 * 1024 * 1024;

/// Most memory the decoder may allocate for one image: an 8-bit RGB image at the pixel limit
/// fits; a 16-bit one of the same size does not, and is refused rather than decoded.
pub(crate) const MAX_DECODE_BYTES: u64 = 256 * 1024 * 1024;

/// Converts `[1, 3, H, W]` pixels in [0, 1] to an 8-bit RGB image (rounded, clamped).
pub fn tensor_to_rgb(image: &Tensor) -> Result<RgbImage> {
    let (one, c, h, w) = image.dims4()?;
    if one != 1 || c != 3 {
        candle_core::bail!(
            "expected one RGB image [1, 3, H, W], got {:?}",
            image.dims()
        );
    }
    let hwc: Vec<f32> = image
        .squeeze(0)?
        .permute((1, 2, 0))?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    let bytes = hwc
        .iter()
        .map(|v| (v.clamp(0.0, 1.0) * 255.0).round() as u8)
        .collect();
    RgbImage::from_raw(w as u32, h as u32, bytes)
        .ok_or_else(|| candle_core::Error::Msg("image buffer has the wrong size".into()))
}

/// Converts an RGB image to `[1, 3, H, W]` pixels in [0, 1] on `device`.
pub(crate) fn rgb_to_tensor(image: &RgbImage, device: &Device) -> Result<Tensor> {
    let (w, h) = image.dimensions();
    let data: Vec<f32> = image
        .as_raw()
        .iter()
        .map(|&b| f32::from(b) / 255.0)
        .collect();
    Tensor::from_vec(data, (h as usize, w as usize, 3), &Device::Cpu)?
        .permute((2, 0, 1))?
        .unsqueeze(0)?
        .contiguous()?
        .to_device(device)
}

/// Why an input image could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Not an image we can decode (or corrupt).
    #[error("cannot read the image: {0}")]
    Decode(#[from] image::ImageError),
    /// Too many pixels, a side too long, or too thin.
    #[error(
        "the image is {width}x{height}; the limits are {MAX_INPUT_SIDE} pixels a side, \
         {MAX_INPUT_PIXELS} pixels in all and one side at most {MAX_INPUT_ASPECT} times the other"
    )]
    TooLarge {
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
    },
    /// Decoding would need more memory than allowed (e.g. 16 bits per channel at full size).
    #[error(
        "the image needs more than {} MiB to decode; send a smaller or 8-bit image",
        MAX_DECODE_BYTES >> 20
    )]
    TooCostly,
    /// The file is larger than [`MAX_INPUT_FILE_BYTES`].
    #[error("{path} is larger than {} MiB", MAX_INPUT_FILE_BYTES >> 20)]
    FileTooLarge {
        /// The file.
        path: String,
    },
    /// Not a regular file (a FIFO, a device, a directory).
    #[error("{path} is not a regular file")]
    NotAFile {
        /// The path.
        path: String,
    },
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Whether an input of `width`×`height` is within every input limit.
pub fn input_size_ok(width: u32, height: u32) -> bool {
    let (long, short) = (width.max(height), width.min(height));
    short >= 1
        && long <= MAX_INPUT_SIDE
        && u64::from(width) * u64::from(height) <= MAX_INPUT_PIXELS
        && long <= short.saturating_mul(MAX_INPUT_ASPECT)
}

/// Decodes image bytes (PNG, JPEG, GIF, WebP), refusing images over the input limits (sides,
/// pixels, aspect) from their header, before decoding them, and decoding under a memory limit.
pub fn decode(bytes: &[u8]) -> std::result::Result<RgbImage, ImageError> {
    let reader = || {
        image::ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| ImageError::Decode(e.into()))
    };
    let (width, height) = reader()?.into_dimensions()?;
    if !input_size_ok(width, height) {
        return Err(ImageError::TooLarge { width, height });
    }
    let mut limited = reader()?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_INPUT_SIDE);
    limits.max_image_height = Some(MAX_INPUT_SIDE);
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    limited.limits(limits);
    let decoded = limited.decode().map_err(|e| match e {
        image::ImageError::Limits(_) => ImageError::TooCostly,
        e => ImageError::Decode(e),
    })?;
    Ok(decoded.into_rgb8())
}

/// Reads a file of at most `max_bytes` bytes: refuses anything but a regular file (a FIFO would
/// block, `/dev/zero` never ends) and reads through a bounded reader, so a file that grows while
/// it is read cannot exceed the limit either.
pub(crate) fn read_bounded(
    path: &std::path::Path,
    max_bytes: u64,
) -> std::result::Result<Vec<u8>, ImageError> {
    use std::io::Read;
    let shown = || path.display().to_string();
    let io = |source| ImageError::Io {
        path: shown(),
        source,
    };
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    // Opening a FIFO for reading blocks until a writer appears; non-blocking, it opens at once
    // and is then refused as not a regular file. (No effect on regular files.)
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::custom_flags(&mut options, libc::O_NONBLOCK);
    let file = options.open(path).map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(ImageError::NotAFile { path: shown() });
    }
    if meta.len() > max_bytes {
        return Err(ImageError::FileTooLarge { path: shown() });
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(max_bytes + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > max_bytes {
        return Err(ImageError::FileTooLarge { path: shown() });
    }
    Ok(bytes)
}

/// Reads and decodes an image file, within the input limits.
pub fn read(path: &std::path::Path) -> std::result::Result<RgbImage, ImageError> {
    decode(&read_bounded(path, MAX_INPUT_FILE_BYTES)?)
}

/// Resizes to exactly `width`×`height` (aspect not kept) with Lanczos-3, as the reference does
/// for init images.
pub(crate) fn resize_exact(image: &RgbImage, width: u32, height: u32) -> RgbImage {
    image::imageops::resize(image, width, height, FilterType::Lanczos3)
}

/// `image` cropped about its centre to the shape of `width`×`height` and resized to it: it
/// fills the frame without being stretched.
pub fn cover(image: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (w, h) = image.dimensions();
    // The largest crop of the target's shape: compare w/h with width/height in integers.
    let (cw, ch) = if u64::from(w) * u64::from(height) > u64::from(h) * u64::from(width) {
        let cw = (u64::from(h) * u64::from(width) / u64::from(height.max(1))) as u32;
        (cw.clamp(1, w), h)
    } else {
        let ch = (u64::from(w) * u64::from(height) / u64::from(width.max(1))) as u32;
        (w, ch.clamp(1, h))
    };
    let cropped = image::imageops::crop_imm(image, (w - cw) / 2, (h - ch) / 2, cw, ch).to_image();
    resize_exact(&cropped, width, height)
}

/// The pixel average of `pictures`, each [`cover`]ed to `width`×`height`: the start of a blend.
pub fn blend(pictures: &[RgbImage], width: u32, height: u32) -> RgbImage {
    let mut sums = vec![0u32; (width as usize) * (height as usize) * 3];
    for picture in pictures {
        let fitted = cover(picture, width, height);
        for (sum, &value) in sums.iter_mut().zip(fitted.as_raw()) {
            *sum += u32::from(value);
        }
    }
    let n = pictures.len().max(1) as u32;
    let averaged = sums.into_iter().map(|s| ((s + n / 2) / n) as u8).collect();
    RgbImage::from_raw(width, height, averaged).unwrap_or_else(|| RgbImage::new(width, height))
}

/// Encodes PNG bytes.
pub fn encode_png(image: &RgbImage) -> std::result::Result<Vec<u8>, image::ImageError> {
    let mut out = Vec::new();
    image.write_to(&mut Cursor::new(&mut out), ImageFormat::Png)?;
    Ok(out)
}

/// Encodes PNG bytes with UTF-8 text chunks (`iTXt`), e.g. the prompt and seed, which image
/// viewers show and which make a shared file reproducible.
pub(crate) fn encode_png_with_text(
    image: &RgbImage,
    text: &[(&str, String)],
) -> std::result::Result<Vec<u8>, png::EncodingError> {
    let mut out = Vec::new();
    let (w, h) = image.dimensions();
    let mut encoder = png::Encoder::new(&mut out, w, h);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    for (key, value) in text {
        encoder.add_itxt_chunk((*key).to_owned(), value.clone())?;
    }
    let mut writer = encoder.write_header()?;
    writer.write_image_data(image.as_raw())?;
    writer.finish()?;
    Ok(out)
}

/// The UTF-8 text chunks of PNG bytes, as (keyword, text) pairs.
pub fn png_text(bytes: &[u8]) -> std::result::Result<Vec<(String, String)>, png::DecodingError> {
    let mut decoder = png::Decoder::new(Cursor::new(bytes));
    decoder.set_ignore_text_chunk(false);
    let reader = decoder.read_info()?;
    let info = reader.info();
    let mut pairs: Vec<(String, String)> = info
        .utf8_text
        .iter()
        .filter_map(|c| Some((c.keyword.clone(), c.get_text().ok()?)))
        .collect();
    pairs.extend(
        info.uncompressed_latin1_text
            .iter()
            .map(|c| (c.keyword.clone(), c.text.clone())),
    );
    Ok(pairs)
}

/// Encodes JPEG bytes at `quality` (1–100).
pub fn encode_jpeg(
    image: &RgbImage,
    quality: u8,
) -> std::result::Result<Vec<u8>, image::ImageError> {
    let mut out = Vec::new();
    JpegEncoder::new_with_quality(&mut out, quality).encode_image(image)?;
    Ok(out)
}

/// Shrinks `image` so its longer side is at most `max_side` (never enlarges).
pub(crate) fn downscale(image: &RgbImage, max_side: u32) -> RgbImage {
    let (w, h) = image.dimensions();
    if w.max(h) <= max_side {
        return image.clone();
    }
    DynamicImage::ImageRgb8(image.clone())
        .thumbnail(max_side, max_side)
        .to_rgb8()
}

/// Writes frames as a looping animated GIF, `delay_ms` per frame.
pub fn encode_gif(
    frames: &[RgbImage],
    delay_ms: u32,
) -> std::result::Result<Vec<u8>, image::ImageError> {
    let mut out = Vec::new();
    {
        let mut encoder = GifEncoder::new_with_speed(&mut out, 10);
        encoder.set_repeat(Repeat::Infinite)?;
        for frame in frames {
            let rgba: RgbaImage = DynamicImage::ImageRgb8(frame.clone()).to_rgba8();
            let delay = image::Delay::from_numer_denom_ms(delay_ms, 1);
            encoder.encode_frame(Frame::from_parts(rgba, 0, 0, delay))?;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blend_averages_pictures_fitted_without_stretching() {
        let red = RgbImage::from_pixel(40, 20, image::Rgb([200, 0, 0]));
        let blue = RgbImage::from_pixel(10, 30, image::Rgb([0, 0, 100]));
        let mixed = blend(&[red, blue], 16, 8);
        assert_eq!(mixed.dimensions(), (16, 8));
        assert!(
            mixed.pixels().all(|p| p.0 == [100, 0, 50]),
            "{:?}",
            mixed.get_pixel(0, 0)
        );
        // A wide picture keeps its middle when made square.
        let halves = RgbImage::from_fn(30, 10, |x, _| {
            image::Rgb(if (10..20).contains(&x) {
                [255, 255, 255]
            } else {
                [0, 0, 0]
            })
        });
        let square = cover(&halves, 10, 10);
        assert_eq!(square.dimensions(), (10, 10));
        assert!(square.get_pixel(5, 5).0[0] > 200 && square.get_pixel(1, 5).0[0] > 200);
    }

    #[test]
    fn tensors_and_images_round_trip() {
        let img = RgbImage::from_fn(5, 3, |x, y| image::Rgb([x as u8 * 50, y as u8 * 100, 7]));
        let t = rgb_to_tensor(&img, &Device::Cpu).unwrap();
        assert_eq!(t.dims(), [1, 3, 3, 5]);
        assert_eq!(tensor_to_rgb(&t).unwrap(), img);
    }

    #[test]
    fn encoded_images_decode_back() {
        let img = RgbImage::from_fn(16, 8, |x, y| image::Rgb([x as u8 * 16, y as u8 * 32, 128]));
        assert_eq!(decode(&encode_png(&img).unwrap()).unwrap(), img);
        assert_eq!(
            decode(&encode_jpeg(&img, 90).unwrap())
                .unwrap()
                .dimensions(),
            (16, 8)
        );
        let gif = encode_gif(&[img.clone(), downscale(&img, 8)], 100).unwrap();
        assert_eq!(&gif[..6], b"GIF89a");
        assert_eq!(downscale(&img, 8).dimensions(), (8, 4));
    }

    /// A valid PNG of `png` whose header is patched to claim `width`×`height` pixels.
    fn claiming(mut png: Vec<u8>, width: u32, height: u32) -> Vec<u8> {
        png[16..20].copy_from_slice(&width.to_be_bytes());
        png[20..24].copy_from_slice(&height.to_be_bytes());
        let crc = crc32fast::hash(&png[12..29]);
        png[29..33].copy_from_slice(&crc.to_be_bytes());
        png
    }

    #[test]
    fn oversized_long_and_thin_images_are_refused_before_decoding() {
        let one = encode_png(&RgbImage::new(1, 1)).unwrap();
        // 400 M pixels; 64 Mi pixels as one row (resizing it once asked for 64 GiB and
        // aborted the process); a side over the limit; a strip thinner than 1:32.
        for (w, h) in [
            (20_000, 20_000),
            (67_108_864, 1),
            (1, 67_108_864),
            (MAX_INPUT_SIDE + 1, 16),
            (4096, 127),
        ] {
            match decode(&claiming(one.clone(), w, h)) {
                Err(ImageError::TooLarge { width, height }) => {
                    assert_eq!((width, height), (w, h));
                }
                other => panic!("{w}x{h}: expected TooLarge, got {other:?}"),
            }
            assert!(!input_size_ok(w, h), "{w}x{h}");
        }
        let message = decode(&claiming(one.clone(), 67_108_864, 1))
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("67108864x1") && message.contains("8192 pixels a side"),
            "{message}"
        );
        for (w, h) in [(8192, 8192), (4096, 128), (1, 1), (64, 2048)] {
            assert!(input_size_ok(w, h), "{w}x{h}");
        }
    }

    #[test]
    fn images_that_would_cost_too_much_to_decode_are_refused() {
        // 8000×8000 at 16 bits per channel with alpha: within the pixel limit, 488 MiB decoded.
        let mut png = Vec::new();
        {
            let mut encoder = png::Encoder::new(&mut png, 1, 1);
            encoder.set_color(png::ColorType::Rgba);
            encoder.set_depth(png::BitDepth::Sixteen);
            let mut writer = encoder.write_header().unwrap();
            writer.write_image_data(&[0; 8]).unwrap();
        }
        let err = decode(&claiming(png, 8000, 8000)).unwrap_err();
        assert!(matches!(err, ImageError::TooCostly), "{err:?}");
        assert!(err.to_string().contains("256 MiB"), "{err}");
    }

    #[test]
    fn only_regular_files_of_bounded_size_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big.bin");
        std::fs::write(&big, vec![7u8; 4096]).unwrap();
        assert_eq!(read_bounded(&big, 4096).unwrap().len(), 4096);
        let err = read_bounded(&big, 4095).unwrap_err();
        assert!(matches!(err, ImageError::FileTooLarge { .. }), "{err:?}");
        // A directory, an endless device and a FIFO (which would block a plain open).
        let err = read(dir.path()).unwrap_err();
        assert!(matches!(err, ImageError::NotAFile { .. }), "{err:?}");
        #[cfg(unix)]
        {
            let err = read(std::path::Path::new("/dev/zero")).unwrap_err();
            assert!(err.to_string().contains("not a regular file"), "{err}");
            let fifo = dir.path().join("fifo");
            let made = std::process::Command::new("mkfifo").arg(&fifo).status();
            assert!(made.is_ok_and(|s| s.success()), "mkfifo");
            let err = read(&fifo).unwrap_err();
            assert!(matches!(err, ImageError::NotAFile { .. }), "{err:?}");
        }
        let err = read(&dir.path().join("missing.png")).unwrap_err();
        assert!(err.to_string().contains("missing.png"), "{err}");
    }

    #[test]
    fn truncated_images_are_a_clear_error() {
        let png = encode_png(&RgbImage::from_pixel(64, 64, image::Rgb([9, 9, 9]))).unwrap();
        let err = decode(&png[..png.len() / 2]).unwrap_err();
        assert!(matches!(err, ImageError::Decode(_)), "{err}");
    }

    #[test]
    fn png_text_chunks_round_trip_unicode() {
        let img = RgbImage::from_pixel(3, 2, image::Rgb([1, 2, 3]));
        let text = [
            ("prompt", "a café at 3:30 ☕ | fog:-0.5".to_owned()),
            ("seed", u64::MAX.to_string()),
        ];
        let png = encode_png_with_text(&img, &text).unwrap();
        assert_eq!(decode(&png).unwrap(), img);
        let read = png_text(&png).unwrap();
        assert!(
            read.contains(&("prompt".to_owned(), text[0].1.clone())),
            "{read:?}"
        );
        assert!(
            read.contains(&("seed".to_owned(), "18446744073709551615".to_owned())),
            "{read:?}"
        );
    }

    #[test]
    fn garbage_is_a_clear_error() {
        let err = decode(b"definitely not an image").unwrap_err();
        assert!(err.to_string().contains("cannot read the image"), "{err}");
    }
}
