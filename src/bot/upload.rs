//! What a finished job's messages (its result, its gallery post) attach: the picture, as a PNG
//! or a JPEG that fits the channel's upload limit, or a zoom video's MP4.

use poise::serenity_prelude as serenity;

use crate::engine::image;
use crate::jobs::{FinishedJob, JobId};

/// A result's files, fitted to an upload limit.
#[derive(Debug, Clone)]
pub(crate) struct Upload {
    /// The picture (a video's last frame) and its file name.
    pub picture: (Vec<u8>, String),
    /// A zoom video's MP4 and its file name.
    pub video: Option<(Vec<u8>, String)>,
}

impl Upload {
    /// `done`'s files within `limit` bytes each: the PNG, else a JPEG of it that fits; a video
    /// as it is (it was made to fit Discord's smallest limit), refused over the limit.
    pub fn of(done: &FinishedJob, job: JobId, limit: usize) -> anyhow::Result<Self> {
        let video = match &done.video {
            Some(mp4) => {
                anyhow::ensure!(
                    mp4.len() <= limit,
                    "the video ({} KiB) is larger than this channel's upload limit",
                    mp4.len() / 1024
                );
                Some((mp4.to_vec(), format!("vqclip-{job}.mp4")))
            }
            None => None,
        };
        Ok(Self {
            picture: fit_picture(&done.png, job, limit)?,
            video,
        })
    }

    /// A finished picture alone (stored `png`) within `limit` bytes, as [`Upload::of`] fits it.
    pub fn of_png(png: &[u8], job: JobId, limit: usize) -> anyhow::Result<Self> {
        Ok(Self {
            picture: fit_picture(png, job, limit)?,
            video: None,
        })
    }

    /// The attachment an embed shows as its image: the picture, unless a video is shown.
    pub fn embedded(&self) -> Option<&str> {
        self.video.is_none().then_some(self.picture.1.as_str())
    }

    /// The files a message attaches: the video alone (Discord shows it with a player), or the
    /// picture.
    pub fn attachments(&self) -> Vec<serenity::CreateAttachment> {
        let (bytes, name) = self.video.as_ref().unwrap_or(&self.picture);
        vec![serenity::CreateAttachment::bytes(
            bytes.clone(),
            name.clone(),
        )]
    }
}

/// The PNG if it fits the upload limit, else a JPEG of it that does.
fn fit_picture(png: &[u8], job: JobId, limit: usize) -> anyhow::Result<(Vec<u8>, String)> {
    if png.len() <= limit {
        return Ok((png.to_vec(), format!("vqclip-{job}.png")));
    }
    let picture = image::decode(png)?;
    for quality in [92, 80, 65] {
        let jpeg = image::encode_jpeg(&picture, quality)?;
        if jpeg.len() <= limit {
            return Ok((jpeg, format!("vqclip-{job}.jpg")));
        }
    }
    anyhow::bail!("the image is larger than this channel's upload limit even as a JPEG")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finished(png: Vec<u8>, video: Option<Vec<u8>>) -> FinishedJob {
        FinishedJob {
            png,
            path: "x.png".into(),
            sha256: String::new(),
            width: 64,
            height: 64,
            final_loss: 0.0,
            device: "cpu".into(),
            seconds: 1.0,
            video: video.map(std::sync::Arc::new),
        }
    }

    #[test]
    fn a_result_over_the_upload_limit_becomes_a_jpeg() {
        let picture = ::image::RgbImage::from_fn(64, 64, |x, y| {
            ::image::Rgb([(x * 4) as u8, (y * 4) as u8, ((x ^ y) * 4) as u8])
        });
        let png = crate::engine::image::encode_png(&picture).unwrap();
        let done = finished(png.clone(), None);
        let upload = Upload::of(&done, JobId(4), png.len()).unwrap();
        assert_eq!(upload.picture, (png.clone(), "vqclip-4.png".to_owned()));
        assert_eq!(upload.embedded(), Some("vqclip-4.png"));
        let upload = Upload::of(&done, JobId(4), png.len() - 1).unwrap();
        assert!(upload.picture.1.ends_with(".jpg") && upload.picture.0.len() < png.len());
        assert!(Upload::of(&done, JobId(4), 10).is_err());
    }

    #[test]
    fn a_video_is_attached_alone_and_never_shrunk() {
        let png = crate::engine::image::encode_png(&::image::RgbImage::new(8, 8)).unwrap();
        let done = finished(png, Some(vec![7; 3000]));
        let upload = Upload::of(&done, JobId(5), 4000).unwrap();
        assert_eq!(upload.embedded(), None);
        assert_eq!(
            upload.video.as_ref().map(|v| v.1.as_str()),
            Some("vqclip-5.mp4")
        );
        assert_eq!(upload.attachments().len(), 1);
        let refused = Upload::of(&done, JobId(5), 2999).unwrap_err();
        assert!(refused.to_string().contains("upload limit"), "{refused}");
    }
}
