//! Model downloads against a loopback fake Hugging Face Hub: first use, resume, checksums,
//! offline mode, tokens, and the `vqclip models` commands.

use std::path::Path;
use std::time::Duration;

use vqclip::config::{Environment, Settings};
use vqclip::models::hub::{DigestOrigin, Hub, HubError};
use vqclip::models::weights;
use vqclip::models::{self, ModelInfo};

use crate::fake_hub::{COMMIT, FakeHub, sha256_hex};

const TINY_CLIP: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/parity/tiny_clip.safetensors"
);
const REPO: &str = "vqclip-test/tiny-clip";
const FILE: &str = "model.safetensors";

fn tiny_clip() -> &'static ModelInfo {
    models::find("tiny_clip").unwrap()
}

/// Settings whose tiny CLIP comes from `REPO` on the fake hub, cached in `cache`.
fn settings(hub: &FakeHub, cache: &Path, extra: &str, env: &[(&str, &str)]) -> Settings {
    let text = format!(
        "[models]\ncache_dir = {:?}\nhub_endpoint = \"{}\"\n{extra}\n\
         [models.tiny_clip]\nrepo = \"{REPO}\"\nfile = \"{FILE}\"\n",
        cache.display().to_string(),
        hub.url
    );
    let env: Environment = env.iter().copied().collect();
    Settings::from_toml(&text, &env).unwrap()
}

/// Waits until the hub has seen no request for a while (abandoned chunk tasks settle).
async fn quiet(hub: &FakeHub) {
    let mut last = usize::MAX;
    loop {
        let now = hub.log().len();
        if now == last {
            return;
        }
        last = now;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn weights_download_on_first_use_and_come_from_the_cache_after() {
    let hub = FakeHub::start().await;
    let bytes = std::fs::read(TINY_CLIP).unwrap();
    hub.publish(REPO, "main", FILE, bytes.clone());
    let cache = tempfile::tempdir().unwrap();
    let s = settings(&hub, cache.path(), "", &[]);
    assert!(matches!(
        weights::resolve(&s.models, tiny_clip()),
        Err(weights::WeightsError::NotCached { .. })
    ));

    let client = Hub::new(&s.models).unwrap();
    let path = client.fetch(tiny_clip(), ()).await.unwrap();
    assert_eq!(
        path,
        cache
            .path()
            .join("models--vqclip-test--tiny-clip/snapshots")
            .join(COMMIT)
            .join(FILE)
    );
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
    assert_eq!(
        weights::resolve(&s.models, tiny_clip()).unwrap(),
        path,
        "the cache layout is the one lookups use"
    );
    let requests = hub.log().len();
    assert_eq!(client.fetch(tiny_clip(), ()).await.unwrap(), path);
    assert_eq!(
        hub.log().len(),
        requests,
        "a cached file is not fetched again"
    );

    // The file is a real CLIP checkpoint: it loads.
    let vb = vqclip::engine::nets::checkpoint::var_builder(
        std::slice::from_ref(&path),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    vqclip::engine::nets::clip::Clip::new(vb, &vqclip::engine::nets::clip::ClipConfig::tiny())
        .unwrap();
}

#[tokio::test]
async fn an_interrupted_download_resumes_where_it_stopped() {
    let hub = FakeHub::start().await;
    let bytes = std::fs::read(TINY_CLIP).unwrap();
    let chunk = 100_000;
    hub.publish(REPO, "main", FILE, bytes.clone());
    hub.fail_after(Some(4));
    let cache = tempfile::tempdir().unwrap();
    let s = settings(&hub, cache.path(), "", &[]);
    let client = Hub::with_chunk_size(&s.models, chunk).unwrap();

    let err = client.fetch(tiny_clip(), ()).await.unwrap_err().to_string();
    assert!(err.contains("HTTP 500") && err.contains(REPO), "{err}");
    assert!(weights::resolve(&s.models, tiny_clip()).is_err());
    quiet(&hub).await;
    assert_eq!(hub.answered(), 4);

    hub.fail_after(None);
    hub.clear_log();
    let path = client.fetch(tiny_clip(), ()).await.unwrap();
    assert_eq!(
        std::fs::read(&path).unwrap(),
        bytes,
        "resumed file is whole"
    );
    let ranges: Vec<(u64, u64)> = hub
        .log()
        .iter()
        .filter_map(|r| r.range)
        .filter(|&r| r != (0, 0))
        .collect();
    let resumed_from = ranges.iter().map(|r| r.0).min().unwrap();
    assert!(
        resumed_from >= chunk as u64 && resumed_from.is_multiple_of(chunk as u64),
        "the second attempt starts after the finished chunks: {ranges:?}"
    );
    let fetched: u64 = ranges
        .iter()
        .map(|&(a, b)| b.min(bytes.len() as u64 - 1) - a + 1)
        .sum();
    assert_eq!(
        fetched,
        bytes.len() as u64 - resumed_from,
        "nothing fetched twice in the second attempt: {ranges:?}"
    );
}

#[tokio::test]
async fn damaged_downloads_are_deleted_and_reported() {
    let hub = FakeHub::start().await;
    let bytes = std::fs::read(TINY_CLIP).unwrap();
    let claimed = sha256_hex(b"the bytes the hub meant to send");
    hub.publish_as(REPO, "main", FILE, bytes.clone(), claimed.clone(), None);
    let cache = tempfile::tempdir().unwrap();
    let s = settings(&hub, cache.path(), "", &[]);
    let err = Hub::new(&s.models)
        .unwrap()
        .fetch(tiny_clip(), ())
        .await
        .unwrap_err();
    match &err {
        HubError::Checksum {
            expected,
            actual,
            origin,
            ..
        } => {
            assert_eq!(expected, &claimed);
            assert_eq!(actual, &sha256_hex(&bytes));
            assert_eq!(*origin, DigestOrigin::Hub);
        }
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("damaged"), "{err}");
    let repo_dir = cache.path().join("models--vqclip-test--tiny-clip");
    assert!(!repo_dir.join("blobs").join(&claimed).exists());
    assert!(!repo_dir.join("snapshots").join(COMMIT).join(FILE).exists());

    // A pinned digest wins over the Hub's claim.
    hub.publish(REPO, "main", FILE, bytes.clone());
    let pinned = "0".repeat(64);
    let text = format!(
        "[models]\ncache_dir = {:?}\nhub_endpoint = \"{}\"\n\
         [models.tiny_clip]\nrepo = \"{REPO}\"\nfile = \"{FILE}\"\nsha256 = \"{pinned}\"\n",
        cache.path().display().to_string(),
        hub.url
    );
    let s = Settings::from_toml(&text, &Environment::default()).unwrap();
    let err = Hub::new(&s.models)
        .unwrap()
        .fetch(tiny_clip(), ())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, HubError::Checksum { origin: DigestOrigin::Pinned, expected, .. } if *expected == pinned),
        "{err:?}"
    );

    let good = sha256_hex(&bytes);
    let s = Settings::from_toml(&text.replace(&pinned, &good), &Environment::default()).unwrap();
    Hub::new(&s.models)
        .unwrap()
        .fetch(tiny_clip(), ())
        .await
        .unwrap();
}

#[tokio::test]
async fn offline_mode_names_the_missing_file_and_never_calls_the_hub() {
    let hub = FakeHub::start().await;
    hub.publish(REPO, "main", FILE, std::fs::read(TINY_CLIP).unwrap());
    let cache = tempfile::tempdir().unwrap();
    for s in [
        settings(&hub, cache.path(), "offline = true", &[]),
        settings(&hub, cache.path(), "", &[("HF_HUB_OFFLINE", "1")]),
    ] {
        let err = Hub::new(&s.models)
            .unwrap()
            .fetch(tiny_clip(), ())
            .await
            .unwrap_err()
            .to_string();
        for needle in [REPO, FILE, "vqclip models download tiny_clip", "offline"] {
            assert!(err.contains(needle), "{needle:?} missing from: {err}");
        }
    }
    assert!(hub.log().is_empty(), "{:?}", hub.log());
}

#[tokio::test]
async fn private_repositories_need_hf_token_which_is_never_shown() {
    let hub = FakeHub::start().await;
    let bytes = std::fs::read(TINY_CLIP).unwrap();
    let token = "hf_sekrit_token_value";
    hub.publish_as(
        REPO,
        "main",
        FILE,
        bytes.clone(),
        sha256_hex(&bytes),
        Some(token),
    );
    let cache = tempfile::tempdir().unwrap();

    let s = settings(&hub, cache.path(), "", &[]);
    let err = Hub::new(&s.models)
        .unwrap()
        .fetch(tiny_clip(), ())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("HTTP 401") && err.contains("HF_TOKEN"),
        "{err}"
    );

    let s = settings(&hub, cache.path(), "", &[("HF_TOKEN", token)]);
    assert!(!format!("{s:?}").contains(token));
    Hub::new(&s.models)
        .unwrap()
        .fetch(tiny_clip(), ())
        .await
        .unwrap();
    let last = hub.log().pop().unwrap();
    assert_eq!(last.authorization, Some(format!("Bearer {token}")));

    // A missing file is a 404 that says what to check.
    let err = Hub::new(&settings(&hub, cache.path(), "", &[]).models)
        .unwrap()
        .fetch(models::find("vit_b16").unwrap(), ())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("HTTP 404") && err.contains("openai/clip-vit-base-patch16"),
        "{err}"
    );
}

#[tokio::test]
async fn pull_request_revisions_download_and_resolve() {
    // The default ViT-B/32 source is a pull-request ref, encoded in the URL and stored under
    // the cache's refs/ as huggingface_hub does.
    let hub = FakeHub::start().await;
    hub.publish(
        "openai/clip-vit-base-patch32",
        "refs/pr/15",
        "model.safetensors",
        b"not really CLIP".to_vec(),
    );
    let cache = tempfile::tempdir().unwrap();
    let s = settings(&hub, cache.path(), "", &[]);
    let vit = models::find("vit_b32").unwrap();
    let path = Hub::new(&s.models).unwrap().fetch(vit, ()).await.unwrap();
    assert_eq!(hub.log()[0].revision, "refs/pr/15");
    assert_eq!(weights::resolve(&s.models, vit).unwrap(), path);
}

#[tokio::test]
async fn mirror_files_come_from_the_pinned_revision_and_must_match_the_pinned_digest() {
    // The Gumbel model comes from the preservation mirror at a fixed commit; a file there whose
    // bytes differ from the mirror's manifest is refused (and not kept), whatever the Hub says.
    let hub = FakeHub::start().await;
    let gumbel = models::find("gumbel_f8_8192").unwrap();
    let pin = gumbel.hub.as_ref().unwrap();
    assert_eq!(pin.repo, "Somnai/pytti-vqgan-checkpoints");
    assert_eq!(pin.file, "openimages/openimages.ckpt");
    hub.publish(
        pin.repo,
        pin.revision,
        pin.file,
        b"a swapped checkpoint".to_vec(),
    );
    let cache = tempfile::tempdir().unwrap();
    let s = settings(&hub, cache.path(), "", &[]);
    let err = Hub::new(&s.models)
        .unwrap()
        .fetch(gumbel, ())
        .await
        .unwrap_err()
        .to_string();
    assert_eq!(
        hub.log()[0].revision,
        "debc22c8f285c7734980c464ff992d335dde6e9a"
    );
    assert!(
        err.contains("5cd6c74810ab97e00e942c25403f73afc081e8b19987b31ec0d9ff5b68e7ab14")
            && err.contains("pinned"),
        "{err}"
    );
    assert!(weights::resolve(&s.models, gumbel).is_err(), "nothing kept");
}
