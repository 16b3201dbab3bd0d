//! Follow-ups of a finished job — rerun, upscale, variation, the larger canvases (zoom out,
//! pan, make square) and zoom videos — as new jobs of the same prompt that start from the
//! parent's latent or picture.

use std::path::{Path, PathBuf};

use super::{
    ImageIndex, JobId, JobParams, LatentStart, Origin, TIMELAPSE_FRAMES, VideoParams,
    image_path_of, latent_path_of,
};
use crate::config::GenerationSettings;
use crate::engine::generate::Canvas;
use crate::engine::video::ZoomVideo;

/// How far a variation strays from the image it starts from: the strength of the seeded noise
/// added to that image's latent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Strength {
    /// Small changes (Vary (Subtle)).
    Subtle,
    /// The 🔀 Variation and V1–V4 buttons.
    Normal,
    /// Large changes (Vary (Strong)).
    Strong,
}

impl Strength {
    /// The noise's standard deviation, in latent units (codebook entries are about unit size).
    pub fn noise(self) -> f64 {
        match self {
            Self::Subtle => 0.25,
            Self::Normal => 0.5,
            Self::Strong => 1.0,
        }
    }
}

/// What a button or reaction asks of a finished job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FollowUp {
    /// The same request with new seeds, as many images as before.
    Rerun,
    /// Twice the width and height of one image, continuing from its final latent: one image.
    Upscale(ImageIndex),
    /// One image's final latent with noise, optimised again with new seeds (a new grid).
    Variation(ImageIndex, Strength),
    /// One image on a larger canvas, the new part painted around it (one image).
    Extend(ImageIndex, Extension),
    /// A zoom video (🎬) from one image.
    Video(ImageIndex),
}

/// A side of a picture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    /// ⬅️
    Left,
    /// ➡️
    Right,
    /// ⬆️
    Up,
    /// ⬇️
    Down,
}

/// How a follow-up grows its parent's canvas (what Midjourney offers on an upscaled image).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Extension {
    /// The picture in the middle of a canvas twice as wide and high.
    ZoomOut2,
    /// The picture in the middle of a canvas 1.5 times as wide and high.
    ZoomOut1_5,
    /// Half a picture more on one side.
    Pan(Side),
    /// The shorter side grown to the longer, the picture in the middle.
    Square,
}

impl Extension {
    /// The canvas around a picture of `width`×`height` tokens; `None` when it would not grow
    /// (a square made square).
    pub fn canvas(self, width: u32, height: u32) -> Option<Canvas> {
        let grow = |side: u32, by: f64| ((f64::from(side) * by).round() as u32).max(side + 1);
        let centred = |cw: u32, ch: u32| Canvas {
            width: cw,
            height: ch,
            x: (cw - width) / 2,
            y: (ch - height) / 2,
        };
        let half = |side: u32| side + (side / 2).max(1);
        Some(match self {
            Self::ZoomOut2 => centred(grow(width, 2.0), grow(height, 2.0)),
            Self::ZoomOut1_5 => centred(grow(width, 1.5), grow(height, 1.5)),
            Self::Square if width == height => return None,
            Self::Square => centred(width.max(height), width.max(height)),
            Self::Pan(side) => {
                let (cw, ch) = match side {
                    Side::Left | Side::Right => (half(width), height),
                    Side::Up | Side::Down => (width, half(height)),
                };
                Canvas {
                    width: cw,
                    height: ch,
                    x: if side == Side::Left { cw - width } else { 0 },
                    y: if side == Side::Up { ch - height } else { 0 },
                }
            }
        })
    }

    /// What users call it.
    pub fn label(self) -> &'static str {
        match self {
            Self::ZoomOut2 => "Zoom Out 2×",
            Self::ZoomOut1_5 => "Zoom Out 1.5×",
            Self::Pan(Side::Left) => "Pan ⬅️",
            Self::Pan(Side::Right) => "Pan ➡️",
            Self::Pan(Side::Up) => "Pan ⬆️",
            Self::Pan(Side::Down) => "Pan ⬇️",
            Self::Square => "Make Square",
        }
    }
}

/// Why a follow-up cannot be made.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FollowUpError {
    /// The parent has no picture (yet).
    #[error("job {0} has no finished picture to start from")]
    NotFinished(JobId),
    /// The parent's latent file is gone (deleted, or made by another machine).
    #[error("the final state of job {0} is no longer stored; rerun it instead")]
    NoLatent(JobId),
    /// The parent's stored parameters do not parse (made by an incompatible version).
    #[error("job {0} was made by an incompatible version of vqclip")]
    Unreadable(JobId),
    /// The button names an image the parent does not have.
    #[error("job {0} has no image {1}")]
    NoSuchImage(JobId, u32),
    /// The larger canvas is over the server's size cap.
    #[error(
        "{what} of job {job} would be {width}x{height}, over this server's limit of {max_side} \
         pixels a side and {max_pixels} in all"
    )]
    TooLarge {
        /// The parent.
        job: JobId,
        /// The extension's name.
        what: &'static str,
        /// The canvas's width in pixels.
        width: u32,
        /// Its height.
        height: u32,
        /// `generation.max_side`.
        max_side: u32,
        /// `generation.max_pixels`.
        max_pixels: u64,
    },
    /// Make Square on a square picture.
    #[error("job {0} is square already")]
    AlreadySquare(JobId),
    /// A follow-up of a zoom video (they are made from pictures).
    #[error("job {0} is a zoom video; use the buttons under the picture it was made from")]
    OfVideo(JobId),
}

impl FollowUp {
    /// The kind of job it makes.
    pub fn kind(self) -> crate::store::jobs::JobKind {
        use crate::store::jobs::JobKind;
        match self {
            Self::Rerun => JobKind::Rerun,
            Self::Upscale(_) => JobKind::Upscale,
            Self::Variation(..) => JobKind::Variation,
            Self::Extend(..) => JobKind::Extend,
            Self::Video(_) => JobKind::Video,
        }
    }

    /// The image of the parent it starts from, if it starts from one.
    pub fn image(self) -> Option<ImageIndex> {
        match self {
            Self::Rerun => None,
            Self::Upscale(image)
            | Self::Variation(image, _)
            | Self::Extend(image, _)
            | Self::Video(image) => Some(image),
        }
    }

    /// The parent's file it starts from, if it starts from one: a video from the image's
    /// picture, the others from its final latent. The name is the job file's (the copy in the
    /// database), the path where it is kept on the host that ran the parent.
    pub fn start_file(self, images: &Path, parent: JobId) -> Option<(String, PathBuf)> {
        use crate::store::events::{IMAGE, LATENT, file_of};
        let image = self.image()?;
        Some(match self {
            Self::Video(_) => (file_of(IMAGE, image), image_path_of(images, parent, image)),
            _ => (
                file_of(LATENT, image),
                latent_path_of(images, parent, image),
            ),
        })
    }
}

/// The zoom video the 🎬 button makes: the default motion, its frames cut to fit
/// `generation.max_steps` (at least one).
fn video_for(max_steps: u32) -> ZoomVideo {
    let motion = ZoomVideo::default();
    ZoomVideo {
        frames: motion.frames.min(max_steps / motion.steps_per_frame).max(1),
        ..motion
    }
}

/// A follow-up job of `parent` for `origin`: a rerun with `seed` (as many images as the
/// parent); an upscale of one image (its own seed, twice the size, half the steps, from its
/// latent; one image); a variation of one image (`seed`, from its latent plus noise, half the
/// steps, each image with its own noise: as many images as the parent's grid, or `grid` for a
/// single parent). Its prompt and models are the parent's.
/// An extension puts one image on a larger canvas (`seed` fills the new part; the full steps;
/// one image), within `(max_side, max_pixels)`.
/// A video makes a zoom video of one image (its own seed; the parent's spec, so the job's
/// command makes the picture and the video again).
/// `start_kept` says whether the file it starts from ([`FollowUp::start_file`]) exists (under
/// `images`, or in the database for a worker to fetch). Sizes and steps stay within `limits`.
pub(crate) fn follow_up_job(
    parent: &crate::store::jobs::Job,
    what: FollowUp,
    (seed, grid): (u64, u32),
    origin: Origin,
    (images, start_kept): (&Path, bool),
    limits: &GenerationSettings,
) -> Result<(crate::store::jobs::NewJob, JobParams), FollowUpError> {
    let (max_side, max_pixels) = (limits.max_side, limits.max_pixels);
    use crate::store::jobs::JobStatus;
    let mut params: JobParams = serde_json::from_value(parent.params.clone())
        .map_err(|_| FollowUpError::Unreadable(parent.id))?;
    if params.video.is_some() {
        return Err(FollowUpError::OfVideo(parent.id));
    }
    if let Some(image) = what.image() {
        match image {
            Some(k) if !(1..=params.grid).contains(&k) || params.grid == 1 => {
                return Err(FollowUpError::NoSuchImage(parent.id, k));
            }
            None if params.grid > 1 => {
                // The job's own buttons name an image; an old message's could not.
                return Err(FollowUpError::NoSuchImage(parent.id, 0));
            }
            _ => {}
        }
        if parent.status != JobStatus::Succeeded {
            return Err(FollowUpError::NotFinished(parent.id));
        }
        if !start_kept {
            return Err(FollowUpError::NoLatent(parent.id));
        }
    }
    let spec = &mut params.spec;
    let parent_steps = spec.steps;
    if what.image().is_some() && !matches!(what, FollowUp::Video(_)) {
        // From a finished latent, a noise start would not be drawn (nor its encoder loaded);
        // a video keeps its picture's spec whole.
        spec.init_noise = Default::default();
    }
    match what {
        FollowUp::Rerun => spec.seed = seed,
        FollowUp::Upscale(image) => {
            let k = image.unwrap_or(1);
            spec.seed = crate::engine::grid::member_seed(spec.seed, k as usize - 1);
            spec.width *= 2;
            spec.height *= 2;
            spec.steps = (spec.steps / 2).max(1);
            params.inputs.start = Some(LatentStart {
                latent: latent_path_of(images, parent.id, image),
                upscale: true,
                noise: None,
                image,
                canvas: None,
            });
            params.grid = 1;
        }
        FollowUp::Variation(image, strength) => {
            spec.seed = seed;
            spec.steps = (spec.steps / 2).max(1);
            params.inputs.start = Some(LatentStart {
                latent: latent_path_of(images, parent.id, image),
                upscale: false,
                noise: Some(strength.noise()),
                image,
                canvas: None,
            });
            // V1–V4 on a grid make a grid like it; Vary on a single image the default.
            if params.grid <= 1 {
                params.grid = grid.clamp(1, crate::engine::grid::MAX_GRID as u32);
            }
        }
        FollowUp::Extend(image, extension) => {
            let factor = crate::engine::nets::vqgan::VqganConfig::preset(&parent.vqgan_model)
                .map(|c| c.downsample_factor() as u32)
                .ok_or(FollowUpError::Unreadable(parent.id))?;
            let canvas = extension
                .canvas(spec.width / factor, spec.height / factor)
                .ok_or(FollowUpError::AlreadySquare(parent.id))?;
            let (width, height) = (canvas.width * factor, canvas.height * factor);
            if width.max(height) > max_side || u64::from(width) * u64::from(height) > max_pixels {
                return Err(FollowUpError::TooLarge {
                    job: parent.id,
                    what: extension.label(),
                    width,
                    height,
                    max_side,
                    max_pixels,
                });
            }
            spec.seed = seed;
            spec.width = width;
            spec.height = height;
            params.inputs.start = Some(LatentStart {
                latent: latent_path_of(images, parent.id, image),
                upscale: false,
                noise: None,
                image,
                canvas: Some(canvas),
            });
            params.grid = 1;
        }
        FollowUp::Video(image) => {
            // The picture's own spec (a grid image's seed), so the job's command makes the
            // picture and then its video.
            spec.seed =
                crate::engine::grid::member_seed(spec.seed, image.unwrap_or(1) as usize - 1);
            params.grid = 1;
            params.video = Some(VideoParams {
                motion: video_for(limits.max_steps),
                start: image_path_of(images, parent.id, image),
                image,
            });
        }
    }
    let spec = &mut params.spec;
    spec.frame_every = (spec.steps / TIMELAPSE_FRAMES).max(1);
    if !spec.story.is_empty() {
        // The story is told again in the follow-up's steps, in the same proportions.
        let scaled =
            u64::from(spec.change_every) * u64::from(spec.steps) / u64::from(parent_steps.max(1));
        spec.change_every = u32::try_from(scaled).unwrap_or(u32::MAX).max(1);
    }
    let spec = &params.spec;
    let job = crate::store::jobs::NewJob {
        kind: what.kind(),
        parent: Some(parent.id),
        requester_id: origin.requester,
        guild_id: origin.guild,
        channel_id: origin.channel,
        prompt: parent.prompt.clone(),
        params: serde_json::to_value(&params).map_err(|_| FollowUpError::Unreadable(parent.id))?,
        seed: spec.seed,
        width: spec.width,
        height: spec.height,
        steps: params.total_steps(),
        cutn: spec.cutn,
        vqgan_model: parent.vqgan_model.clone(),
        clip_model: parent.clip_model.clone(),
    };
    Ok((job, params))
}

/// Remix: `text` replaces the words of a follow-up `job` made by [`follow_up_job`] (its
/// prompts, story and `--no`); everything else stays the parent's. Flags other than `--no` are
/// refused: a variation continues the parent's latent, so its size, models and the rest stay.
pub(crate) fn remix(
    job: &mut crate::store::jobs::NewJob,
    params: &mut JobParams,
    text: &str,
) -> Result<(), String> {
    let parsed = crate::engine::prompt::parse(text).map_err(|e| e.to_string())?;
    if parsed.flags != crate::engine::prompt::PromptFlags::default() {
        return Err(
            "a remix changes the words (and --no); for other settings, start a new /imagine".into(),
        );
    }
    let spec = &mut params.spec;
    spec.prompts = parsed.prompts;
    spec.story = parsed.story;
    if spec.story.is_empty() {
        spec.change_every = 0;
    } else if spec.change_every == 0 {
        spec.change_every = spec.steps.div_ceil(spec.story.len() as u32).max(1);
    }
    spec.check()?;
    job.prompt = text.to_owned();
    job.params = serde_json::to_value(&*params).map_err(|e| e.to_string())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_video_button_fits_the_servers_steps_and_stored_videos_are_bounded() {
        assert_eq!(video_for(1000), ZoomVideo::default());
        assert_eq!(video_for(20).frames, 2);
        assert_eq!(video_for(5).frames, 1);
        let spec = crate::engine::generate::GenerationSpec::new(Vec::new(), 32, 32, 1);
        let mut params = JobParams {
            spec,
            inputs: Default::default(),
            grid: 1,
            video: Some(VideoParams {
                motion: video_for(20),
                start: "1.png".into(),
                image: None,
            }),
        };
        assert_eq!(params.total_steps(), 20);
        params.check().unwrap();
        // Another host's row asking for more than the engine's steps, or a grid, is refused.
        let video = params.video.as_mut().unwrap();
        video.motion.frames = 600;
        video.motion.steps_per_frame = 200;
        assert!(params.check().unwrap_err().contains("steps in all"));
        let video = params.video.as_mut().unwrap();
        video.motion = video_for(20);
        params.grid = 4;
        assert!(params.check().unwrap_err().contains("one picture"));
    }
}
