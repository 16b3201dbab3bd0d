//! Pixels in and out: tensors ↔ RGB images ↔ PNG/JPEG bytes, previews, time-lapse GIFs, and
//! images read from files or uploads (bounded, with clear errors).

use std::io::Cursor;

use candle_core::{DType, Device, Result, Tensor};
use image::codecs::gif::{GifEncoder, Repeat};
use image::codecs::jpeg::JpegEncoder;
use image::imageops::FilterType;
use image::{DynamicImage, Frame, ImageFormat, RgbImage, RgbaImage};

/// Largest decoded image accepted (pixels), so a hostile upload cannot exhaust memory.
pub const MAX_INPUT_PIXELS: u64 = 64 * 1024 * 1024;

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
pub fn rgb_to_tensor(image: &RgbImage, device: &Device) -> Result<Tensor> {
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
    /// Too many pixels.
    #[error("the image is {width}x{height}, more than {MAX_INPUT_PIXELS} pixels")]
    TooLarge {
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
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

/// Decodes image bytes (PNG, JPEG, GIF, WebP), refusing images over [`MAX_INPUT_PIXELS`] before
/// decoding them.
pub fn decode(bytes: &[u8]) -> std::result::Result<RgbImage, ImageError> {
    let reader = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ImageError::Decode(e.into()))?;
    let (width, height) = reader.into_dimensions()?;
    if u64::from(width) * u64::from(height) > MAX_INPUT_PIXELS {
        return Err(ImageError::TooLarge { width, height });
    }
    let reader = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ImageError::Decode(e.into()))?;
    Ok(reader.decode()?.to_rgb8())
}

/// Reads and decodes an image file.
pub fn read(path: &std::path::Path) -> std::result::Result<RgbImage, ImageError> {
    let bytes = std::fs::read(path).map_err(|source| ImageError::Io {
        path: path.display().to_string(),
        source,
    })?;
    decode(&bytes)
}

/// Resizes to exactly `width`×`height` (aspect not kept) with Lanczos-3, as the reference does
/// for init images.
pub fn resize_exact(image: &RgbImage, width: u32, height: u32) -> RgbImage {
    image::imageops::resize(image, width, height, FilterType::Lanczos3)
}

/// Encodes PNG bytes.
pub fn encode_png(image: &RgbImage) -> std::result::Result<Vec<u8>, image::ImageError> {
    let mut out = Vec::new();
    image.write_to(&mut Cursor::new(&mut out), ImageFormat::Png)?;
    Ok(out)
}

/// Encodes PNG bytes with UTF-8 text chunks (`iTXt`), e.g. the prompt and seed, which image
/// viewers show and which make a shared file reproducible.
pub fn encode_png_with_text(
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
pub fn downscale(image: &RgbImage, max_side: u32) -> RgbImage {
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

    /// CRC-32 (IEEE), for patching PNG chunks in tests.
    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    #[test]
    fn oversized_images_are_refused_before_decoding() {
        // A valid 1×1 PNG whose header then claims 20000×20000 pixels (400 M > the limit).
        let mut png = encode_png(&RgbImage::new(1, 1)).unwrap();
        png[16..20].copy_from_slice(&20_000u32.to_be_bytes());
        png[20..24].copy_from_slice(&20_000u32.to_be_bytes());
        let crc = crc32(&png[12..29]);
        png[29..33].copy_from_slice(&crc.to_be_bytes());
        match decode(&png) {
            Err(ImageError::TooLarge {
                width: 20_000,
                height: 20_000,
            }) => {}
            other => panic!("expected TooLarge, got {other:?}"),
        }
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
