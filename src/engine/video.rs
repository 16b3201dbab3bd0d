//! Zoom videos (the reference's `--zoom_video`): each frame continues from the one before it,
//! zoomed in (and optionally turned and shifted) a little, re-encoded by the VQGAN and
//! optimised for a few steps; the frames become an MP4 (H.264) that Discord plays inline.

use std::io::Cursor;
use std::sync::atomic::{AtomicBool, Ordering};

use image::RgbImage;
use serde::{Deserialize, Serialize};

use super::generate::{GenerateError, GenerationInputs, GenerationSpec, Generator, Models};

/// Most frames of a zoom video.
pub const MAX_FRAMES: u32 = 600;
/// Most steps per frame.
pub const MAX_STEPS_PER_FRAME: u32 = 200;
/// The largest video made: under Discord's smallest upload limit (10 MiB), with room for the
/// message's other files.
pub const MAX_VIDEO_BYTES: u64 = 8 << 20;

/// A zoom video's motion and length.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ZoomVideo {
    /// Frames after the first (the first is the starting picture).
    pub frames: u32,
    /// Optimiser steps per frame.
    pub steps_per_frame: u32,
    /// Zoom per frame: 1.04 shows the middle 1/1.04 of the last frame, enlarged.
    pub zoom: f64,
    /// Turn per frame, degrees counter-clockwise.
    #[serde(default)]
    pub rotate: f64,
    /// Shift per frame, in pixels (right, down) of the picture's content.
    #[serde(default)]
    pub shift: (f64, f64),
    /// Frames per second of the video.
    pub fps: u32,
}

impl Default for ZoomVideo {
    fn default() -> Self {
        Self {
            frames: 48,
            steps_per_frame: 10,
            zoom: 1.04,
            rotate: 0.0,
            shift: (0.0, 0.0),
            fps: 12,
        }
    }
}

impl ZoomVideo {
    /// Checks every number against the limits; the message names the field.
    pub fn check(&self) -> Result<(), String> {
        if !(1..=MAX_FRAMES).contains(&self.frames) {
            return Err(format!(
                "a zoom video has 1 to {MAX_FRAMES} frames, not {}",
                self.frames
            ));
        }
        if !(1..=MAX_STEPS_PER_FRAME).contains(&self.steps_per_frame) {
            return Err(format!(
                "a zoom video's frames take 1 to {MAX_STEPS_PER_FRAME} steps, not {}",
                self.steps_per_frame
            ));
        }
        if !(self.zoom.is_finite() && (0.5..=2.0).contains(&self.zoom)) {
            return Err(format!(
                "the zoom per frame must be from 0.5 to 2, not {}",
                self.zoom
            ));
        }
        if !(self.rotate.is_finite() && self.rotate.abs() <= 45.0) {
            return Err(format!(
                "the turn per frame must be within ±45 degrees, not {}",
                self.rotate
            ));
        }
        let (dx, dy) = self.shift;
        if !(dx.is_finite() && dy.is_finite() && dx.abs() <= 256.0 && dy.abs() <= 256.0) {
            return Err(format!(
                "the shift per frame must be within ±256 pixels, not {dx},{dy}"
            ));
        }
        if !(1..=60).contains(&self.fps) {
            return Err(format!(
                "a video plays at 1 to 60 frames a second, not {}",
                self.fps
            ));
        }
        Ok(())
    }

    /// Optimiser steps in all.
    pub fn steps(&self) -> u64 {
        u64::from(self.frames) * u64::from(self.steps_per_frame)
    }

    /// The video's length in seconds (the starting picture counts as a frame).
    pub fn seconds(&self) -> f64 {
        f64::from(self.frames + 1) / f64::from(self.fps)
    }
}

/// The next frame's start: `image` zoomed by `zoom` about its centre, turned by `rotate` degrees
/// and shifted by `shift` pixels, resampled bilinearly; what falls outside comes from the
/// nearest edge.
pub fn zoom_frame(image: &RgbImage, zoom: f64, rotate: f64, shift: (f64, f64)) -> RgbImage {
    let (w, h) = image.dimensions();
    let (cx, cy) = (f64::from(w) / 2.0, f64::from(h) / 2.0);
    let (sin, cos) = rotate.to_radians().sin_cos();
    let sample = |x: f64, y: f64| -> [f64; 3] {
        let x = x.clamp(0.0, f64::from(w - 1));
        let y = y.clamp(0.0, f64::from(h - 1));
        let (x0, y0) = (x.floor() as u32, y.floor() as u32);
        let (x1, y1) = ((x0 + 1).min(w - 1), (y0 + 1).min(h - 1));
        let (fx, fy) = (x - f64::from(x0), y - f64::from(y0));
        let mut out = [0.0; 3];
        for (c, value) in out.iter_mut().enumerate() {
            let p = |x, y| f64::from(image.get_pixel(x, y)[c]);
            let top = p(x0, y0) * (1.0 - fx) + p(x1, y0) * fx;
            let bottom = p(x0, y1) * (1.0 - fx) + p(x1, y1) * fx;
            *value = top * (1.0 - fy) + bottom * fy;
        }
        out
    };
    RgbImage::from_fn(w, h, |x, y| {
        // Where this output pixel's centre comes from in the input: undo the shift, the turn
        // and the zoom, about the centre.
        let (px, py) = (
            f64::from(x) + 0.5 - cx - shift.0,
            f64::from(y) + 0.5 - cy - shift.1,
        );
        let (rx, ry) = (cos * px - sin * py, sin * px + cos * py);
        let (sx, sy) = (rx / zoom + cx - 0.5, ry / zoom + cy - 0.5);
        let v = sample(sx, sy);
        image::Rgb(v.map(|v| v.round().clamp(0.0, 255.0) as u8))
    })
}

/// Makes a zoom video from `start`, a finished picture of `spec`'s size: frame 0 is `start`;
/// each next frame is the last one through [`zoom_frame`], encoded by the VQGAN (the models
/// need the encoder) and optimised for `video.steps_per_frame` steps towards `spec`'s prompts
/// with a fresh optimiser (as the reference recreates its own), seed `spec.seed + k` for frame
/// `k`. `on_frame` hears each frame as it is made, with its final loss; `cancel` is checked
/// between steps.
pub fn zoom_video(
    models: &Models,
    spec: &GenerationSpec,
    start: RgbImage,
    video: &ZoomVideo,
    cancel: &AtomicBool,
    mut on_frame: impl FnMut(u32, &RgbImage, f64),
) -> Result<Vec<RgbImage>, GenerateError> {
    video.check().map_err(GenerateError::InvalidSpec)?;
    if start.dimensions() != (spec.width, spec.height) {
        return Err(GenerateError::InvalidSpec(format!(
            "the starting picture is {}x{}, the video {}x{}",
            start.width(),
            start.height(),
            spec.width,
            spec.height
        )));
    }
    // A story's picture ends on the scene of its last step: the video goes on with that one
    // (and the `--no` prompts that guided every scene).
    let prompts = match spec.story.get(spec.scene_at(spec.steps.saturating_sub(1))) {
        Some(scene) => scene.iter().chain(&spec.prompts).cloned().collect(),
        None => spec.prompts.clone(),
    };
    let mut frames = vec![start];
    for k in 1..=video.frames {
        let last = frames.last().cloned().unwrap_or_default();
        let moved = zoom_frame(&last, video.zoom, video.rotate, video.shift);
        let frame_spec = GenerationSpec {
            steps: video.steps_per_frame,
            seed: spec.seed.wrapping_add(u64::from(k)),
            preview_every: 0,
            frame_every: 0,
            story: Vec::new(),
            change_every: 0,
            prompts: prompts.clone(),
            ..spec.clone()
        };
        let inputs = GenerationInputs {
            init_image: Some(moved),
            ..Default::default()
        };
        let mut run = Generator::new(models, frame_spec, inputs)?;
        while !run.is_done() {
            if cancel.load(Ordering::Relaxed) {
                return Err(GenerateError::Cancelled);
            }
            run.step()?;
        }
        let output = run.finish()?;
        on_frame(k, &output.image, output.final_loss);
        frames.push(output.image);
    }
    Ok(frames)
}

/// Why a video could not be encoded.
#[derive(Debug, thiserror::Error)]
pub enum VideoError {
    /// No frames, frames of different sizes, or an odd side (H.264's 4:2:0 needs even ones).
    #[error("{0}")]
    Frames(String),
    /// The encoder or the container failed.
    #[error("cannot encode the video: {0}")]
    Encode(String),
}

/// `frames` as an MP4 file (H.264 Constrained Baseline, 4:2:0) at `fps`, at most `max_bytes`
/// (encoded again with a coarser quantiser while it is larger): what Discord, browsers and
/// phones play inline.
pub fn encode_mp4(frames: &[RgbImage], fps: u32, max_bytes: u64) -> Result<Vec<u8>, VideoError> {
    let Some(first) = frames.first() else {
        return Err(VideoError::Frames(
            "a video needs at least one frame".into(),
        ));
    };
    let (w, h) = first.dimensions();
    if frames.iter().any(|f| f.dimensions() != (w, h)) {
        return Err(VideoError::Frames("the frames differ in size".into()));
    }
    if w % 2 == 1 || h % 2 == 1 || w > u32::from(u16::MAX) || h > u32::from(u16::MAX) {
        return Err(VideoError::Frames(format!(
            "a video cannot be {w}x{h}: even sides only"
        )));
    }
    let mut size = 0;
    // The quantiser's floor: the encoder's own choice first, then coarser ones.
    for min_qp in [0, 28, 34, 40, 46] {
        let mp4 = encode_mp4_at(frames, fps.clamp(1, 60), min_qp)?;
        if mp4.len() as u64 <= max_bytes {
            return Ok(mp4);
        }
        size = mp4.len();
    }
    Err(VideoError::Encode(format!(
        "{} frames of {w}x{h} take {size} bytes even at the coarsest quantiser, over {max_bytes}",
        frames.len()
    )))
}

/// [`encode_mp4`] with the quantiser at least `min_qp`.
fn encode_mp4_at(frames: &[RgbImage], fps: u32, min_qp: u8) -> Result<Vec<u8>, VideoError> {
    use openh264::encoder::{Encoder, EncoderConfig, FrameRate, QpRange, RateControlMode};
    use openh264::formats::{RgbSliceU8, YUVBuffer};
    let (w, h) = frames.first().map_or((0, 0), RgbImage::dimensions);
    // Buffer-based rate control never skips a frame (bit-rate modes do, or warn).
    let config = EncoderConfig::new()
        .rate_control_mode(RateControlMode::Bufferbased)
        .qp(QpRange::new(min_qp, 51))
        .max_frame_rate(FrameRate::from_hz(fps as f32))
        .skip_frames(false);
    let api = openh264::OpenH264API::from_source();
    let fail = |e: openh264::Error| VideoError::Encode(e.to_string());
    let mut encoder = Encoder::with_api_config(api, config).map_err(fail)?;
    let (mut sps, mut pps) = (None, None);
    let mut samples = Vec::with_capacity(frames.len());
    for frame in frames {
        let yuv =
            YUVBuffer::from_rgb8_source(RgbSliceU8::new(frame.as_raw(), (w as usize, h as usize)));
        let stream = encoder.encode(&yuv).map_err(fail)?.to_vec();
        // Annex B from the encoder; MP4 wants each NAL unit with its length instead of a start
        // code, and the parameter sets in the track's header.
        let mut sample = Vec::with_capacity(stream.len());
        let mut sync = false;
        for unit in openh264::nal_units(&stream) {
            let unit = strip_start_code(unit);
            let Some(&header) = unit.first() else {
                continue;
            };
            match header & 0x1f {
                7 => sps = Some(unit.to_vec()),
                8 => pps = Some(unit.to_vec()),
                kind => {
                    sync |= kind == 5;
                    sample.extend_from_slice(&(unit.len() as u32).to_be_bytes());
                    sample.extend_from_slice(unit);
                }
            }
        }
        samples.push((sample, sync));
    }
    let (Some(sps), Some(pps)) = (sps, pps) else {
        return Err(VideoError::Encode(
            "the encoder gave no parameter sets".into(),
        ));
    };
    let timescale = fps * 1000;
    let mut writer = mp4::Mp4Writer::write_start(
        Cursor::new(Vec::new()),
        &mp4::Mp4Config {
            major_brand: str::parse("isom").map_err(|e| VideoError::Encode(format!("{e}")))?,
            minor_version: 512,
            compatible_brands: ["isom", "iso2", "avc1", "mp41"]
                .iter()
                .map(|b| str::parse(b))
                .collect::<Result<_, _>>()
                .map_err(|e| VideoError::Encode(format!("{e}")))?,
            timescale,
        },
    )
    .map_err(|e| VideoError::Encode(e.to_string()))?;
    let track = mp4::TrackConfig {
        track_type: mp4::TrackType::Video,
        timescale,
        language: "und".into(),
        media_conf: mp4::MediaConfig::AvcConfig(mp4::AvcConfig {
            width: w as u16,
            height: h as u16,
            seq_param_set: sps,
            pic_param_set: pps,
        }),
    };
    writer
        .add_track(&track)
        .map_err(|e| VideoError::Encode(e.to_string()))?;
    for (i, (bytes, sync)) in samples.into_iter().enumerate() {
        let sample = mp4::Mp4Sample {
            start_time: i as u64 * 1000,
            duration: 1000,
            rendering_offset: 0,
            is_sync: sync,
            bytes: mp4::Bytes::from(bytes),
        };
        writer
            .write_sample(1, &sample)
            .map_err(|e| VideoError::Encode(e.to_string()))?;
    }
    writer
        .write_end()
        .map_err(|e| VideoError::Encode(e.to_string()))?;
    Ok(writer.into_writer().into_inner())
}

/// A NAL unit without its Annex B start code (`00 00 01` or `00 00 00 01`).
fn strip_start_code(unit: &[u8]) -> &[u8] {
    let zeros = unit.iter().take_while(|&&b| b == 0).count();
    if zeros >= 2 && unit.get(zeros) == Some(&1) {
        &unit[zeros + 1..]
    } else {
        unit
    }
}

/// What an MP4 file holds, read back: the first video track's size, frame count and length.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VideoInfo {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Frames.
    pub frames: u32,
    /// Length in seconds.
    pub seconds: f64,
}

/// Reads `mp4`'s first video track and decodes every frame with OpenH264, so a video is known
/// to play: its size, frame count and length, and the decoded frames (RGB).
pub fn decode_mp4(mp4_bytes: &[u8]) -> Result<(VideoInfo, Vec<RgbImage>), VideoError> {
    use openh264::decoder::Decoder;
    use openh264::formats::YUVSource;
    let bad = |e: mp4::Error| VideoError::Encode(e.to_string());
    let mut reader =
        mp4::Mp4Reader::read_header(Cursor::new(mp4_bytes), mp4_bytes.len() as u64).map_err(bad)?;
    let (id, track) = reader
        .tracks()
        .iter()
        .find(|(_, t)| matches!(t.track_type(), Ok(mp4::TrackType::Video)))
        .map(|(id, t)| (*id, t))
        .ok_or_else(|| VideoError::Frames("no video track".into()))?;
    let info = VideoInfo {
        width: u32::from(track.width()),
        height: u32::from(track.height()),
        frames: track.sample_count(),
        seconds: track.duration().as_secs_f64(),
    };
    let mut stream = Vec::new();
    for set in [
        track.sequence_parameter_set().map_err(bad)?.to_vec(),
        track.picture_parameter_set().map_err(bad)?.to_vec(),
    ] {
        stream.extend_from_slice(&[0, 0, 0, 1]);
        stream.extend_from_slice(&set);
    }
    let mut decoder = Decoder::new().map_err(|e| VideoError::Encode(e.to_string()))?;
    let mut images = Vec::new();
    let mut decode = |annex_b: &[u8], images: &mut Vec<RgbImage>| -> Result<(), VideoError> {
        if let Some(yuv) = decoder
            .decode(annex_b)
            .map_err(|e| VideoError::Encode(e.to_string()))?
        {
            let (w, h) = yuv.dimensions();
            let mut rgb = vec![0; w * h * 3];
            yuv.write_rgb8(&mut rgb);
            images.push(
                RgbImage::from_raw(w as u32, h as u32, rgb)
                    .ok_or_else(|| VideoError::Frames("a decoded frame is malformed".into()))?,
            );
        }
        Ok(())
    };
    decode(&stream, &mut images)?;
    for sample_id in 1..=info.frames {
        let Some(sample) = reader.read_sample(id, sample_id).map_err(bad)? else {
            continue;
        };
        let mut annex_b = Vec::with_capacity(sample.bytes.len() + 16);
        let mut rest = &sample.bytes[..];
        while rest.len() >= 4 {
            let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            let unit = rest
                .get(4..4 + len)
                .ok_or_else(|| VideoError::Frames("a sample's unit runs past its end".into()))?;
            annex_b.extend_from_slice(&[0, 0, 0, 1]);
            annex_b.extend_from_slice(unit);
            rest = &rest[4 + len..];
        }
        decode(&annex_b, &mut images)?;
    }
    Ok((info, images))
}
