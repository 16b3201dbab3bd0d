//! The store on both backends: migrations, every query's round trip, concurrency, u64 mapping.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use vqclip::store::{
    self, Backend, JobId, Location, Timestamp, events,
    gallery::{self, STAR},
    guilds,
    jobs::{self, JobKind, JobOutput, JobStatus, LostRuns},
    users::{self, UserSettings},
    workers,
};

use crate::support::{on_both_backends, sample_job, test_pool};

/// Every table of the schema (besides sqlx's own), by name.
const TABLES: [&str; 11] = [
    "gallery_posts",
    "guild_names",
    "guild_settings",
    "job_files",
    "job_results",
    "jobs",
    "member_names",
    "user_bans",
    "user_settings",
    "votes",
    "workers",
];

/// Migration 7 rebuilds SQLite's jobs table to widen its kind CHECK: every job, link and counter
/// survives — children keep their parent, gallery posts, votes, results and files their job,
/// the foreign keys hold and still act, and a deleted job's id is not handed out again.
#[tokio::test]
async fn migration_7_keeps_every_job_and_link_and_takes_the_new_kinds() {
    let dir = tempfile::tempdir().unwrap();
    let pool = store::connect(&Location::Sqlite(dir.path().join("old.sqlite")))
        .await
        .unwrap();
    let up_to_6 = sqlx::migrate::Migrator {
        migrations: std::borrow::Cow::Owned(
            store::SQLITE_MIGRATOR
                .iter()
                .filter(|m| m.version <= 6)
                .cloned()
                .collect(),
        ),
        ..sqlx::migrate::Migrator::DEFAULT
    };
    up_to_6.run(pool.pool()).await.unwrap();
    let first = jobs::insert_job(&pool, &sample_job(7, "a castle"))
        .await
        .unwrap();
    let child = jobs::NewJob {
        kind: JobKind::Upscale,
        parent: Some(first),
        ..sample_job(7, "a castle")
    };
    let second = jobs::insert_job(&pool, &child).await.unwrap();
    let third = jobs::insert_job(&pool, &sample_job(8, "gone"))
        .await
        .unwrap();
    for sql in [
        format!("DELETE FROM jobs WHERE id = {}", third.0),
        format!(
            "INSERT INTO gallery_posts (job_id, guild_id, channel_id, message_id, posted_at) \
             VALUES ({}, 1, 2, 3, 4)",
            first.0
        ),
        "INSERT INTO votes (post_id, user_id, emoji, voted_at) VALUES (1, 9, 'x', 5)".into(),
        format!(
            "INSERT INTO job_results (job_id, channel_id, message_id, posted_at) \
             VALUES ({}, 2, 30, 4)",
            second.0
        ),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(pool.pool())
            .await
            .unwrap();
    }

    // 7, and every migration after it.
    let later: Vec<i64> = store::SQLITE_MIGRATOR
        .iter()
        .map(|m| m.version)
        .filter(|&v| v >= 7)
        .collect();
    assert_eq!(later.first(), Some(&7));
    assert_eq!(store::migrate(&pool).await.unwrap(), later);

    let broken: Vec<String> = sqlx::query_scalar("SELECT \"table\" FROM pragma_foreign_key_check")
        .fetch_all(pool.pool())
        .await
        .unwrap();
    assert!(broken.is_empty(), "{broken:?}");
    let kept = jobs::get_job(&pool, second).await.unwrap().unwrap();
    assert_eq!((kept.kind, kept.parent), (JobKind::Upscale, Some(first)));
    let db = pool.pool().clone();
    let count = |sql: &'static str| {
        let db = db.clone();
        async move {
            sqlx::query_scalar::<_, i64>(sql)
                .fetch_one(&db)
                .await
                .unwrap()
        }
    };
    assert_eq!(count("SELECT count(*) FROM votes").await, 1);
    assert_eq!(count("SELECT count(*) FROM job_results").await, 1);
    // The new kinds are stored; the deleted job's id stays retired.
    let extend = jobs::NewJob {
        kind: JobKind::Extend,
        parent: Some(second),
        ..sample_job(7, "a castle")
    };
    let fourth = jobs::insert_job(&pool, &extend).await.unwrap();
    assert!(fourth.0 > third.0, "{fourth:?} reuses a deleted id");
    let video = jobs::NewJob {
        kind: JobKind::Video,
        ..sample_job(7, "a castle")
    };
    jobs::insert_job(&pool, &video).await.unwrap();
    // The foreign keys still act: deleting the first job takes its gallery post and vote, and
    // its child loses its parent.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DELETE FROM jobs WHERE id = {}",
        first.0
    )))
    .execute(pool.pool())
    .await
    .unwrap();
    assert_eq!(count("SELECT count(*) FROM gallery_posts").await, 0);
    assert_eq!(count("SELECT count(*) FROM votes").await, 0);
    let orphan = jobs::get_job(&pool, second).await.unwrap().unwrap();
    assert_eq!(orphan.parent, None);
    assert_eq!(count("PRAGMA foreign_keys").await, 1);
}

#[tokio::test]
async fn migrations_create_every_table_in_an_empty_database() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested/dir/new.sqlite");
    let pool = store::connect(&Location::Sqlite(path.clone()))
        .await
        .unwrap();
    assert!(
        path.exists(),
        "connect creates the file and its directories"
    );
    assert_eq!(
        store::applied_versions(&pool).await.unwrap(),
        Vec::<i64>::new()
    );

    let applied = store::migrate(&pool).await.unwrap();

    let expected: Vec<i64> = store::SQLITE_MIGRATOR.iter().map(|m| m.version).collect();
    assert_eq!(applied, expected);
    assert!(
        store::migrate(&pool).await.unwrap().is_empty(),
        "second run applies nothing"
    );
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE '\\_%' ESCAPE '\\'
         AND name NOT LIKE 'sqlite%' ORDER BY name",
    )
    .fetch_all(pool.pool())
    .await
    .unwrap();
    assert_eq!(tables, TABLES);
}

#[tokio::test]
async fn postgres_migrations_create_the_same_tables_at_the_same_versions() {
    let url = crate::postgres::new_database().await;
    let pool = store::connect(&Location::Postgres(url)).await.unwrap();
    assert_eq!(pool.backend(), Backend::Postgres);
    assert_eq!(
        store::applied_versions(&pool).await.unwrap(),
        Vec::<i64>::new()
    );

    let applied = store::migrate(&pool).await.unwrap();

    let sqlite: Vec<i64> = store::SQLITE_MIGRATOR.iter().map(|m| m.version).collect();
    assert_eq!(applied, sqlite, "one version line for both backends");
    assert!(store::migrate(&pool).await.unwrap().is_empty());
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::TEXT FROM information_schema.tables
         WHERE table_schema = current_schema() AND table_name NOT LIKE '\\_%' ESCAPE '\\'
         ORDER BY table_name",
    )
    .fetch_all(pool.pool())
    .await
    .unwrap();
    assert_eq!(tables, TABLES);
}

#[tokio::test]
async fn connections_use_wal_foreign_keys_and_a_busy_timeout() {
    let (_dir, pool) = test_pool().await;
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(pool.pool())
        .await
        .unwrap();
    let fk: i64 = sqlx::query_scalar("PRAGMA foreign_keys")
        .fetch_one(pool.pool())
        .await
        .unwrap();
    let busy: i64 = sqlx::query_scalar("PRAGMA busy_timeout")
        .fetch_one(pool.pool())
        .await
        .unwrap();
    assert_eq!(mode, "wal");
    assert_eq!(fk, 1);
    assert!(busy >= 1000, "busy_timeout = {busy} ms");
}

on_both_backends! {
    async fn a_job_round_trips_every_field(pool) {
        let mut new = sample_job(u64::MAX, "a castle at 3:30 pm | fog:0.5");
        new.seed = u64::MAX;
        new.guild_id = Some(u64::MAX - 1);
        new.channel_id = Some(1 << 63);
        let before = Timestamp::now();

        let id = jobs::insert_job(&pool, &new).await.unwrap();
        let job = jobs::get_job(&pool, id).await.unwrap().expect("job exists");

        assert_eq!(job.id, id);
        assert_eq!(job.kind, JobKind::Imagine);
        assert_eq!(job.parent, None);
        assert_eq!(job.requester_id, u64::MAX);
        assert_eq!(job.guild_id, Some(u64::MAX - 1));
        assert_eq!(job.channel_id, Some(1 << 63));
        assert_eq!(job.message_id, None);
        assert_eq!(job.prompt, new.prompt);
        assert_eq!(job.params, new.params);
        assert_eq!(job.seed, u64::MAX);
        assert_eq!(
            (job.width, job.height, job.steps, job.cutn),
            (256, 256, 300, 32)
        );
        assert_eq!(job.vqgan_model, "imagenet_f16_16384");
        assert_eq!(job.clip_model, "vit_b32");
        assert_eq!(job.crate_version, env!("CARGO_PKG_VERSION"));
        assert_eq!(job.status, JobStatus::Queued);
        assert_eq!((job.device, job.error, job.iteration), (None, None, 0));
        assert!(job.created_at >= before && job.created_at <= Timestamp::now());
        assert_eq!((job.started_at, job.finished_at), (None, None));
        assert_eq!(
            (job.output_path, job.output_sha256, job.final_loss),
            (None, None, None)
        );
        assert_eq!(jobs::get_job(&pool, JobId(id.0 + 1)).await.unwrap(), None);
    }

    async fn u64_seeds_round_trip_across_the_whole_range(pool) {
        for seed in [0, 1, i64::MAX as u64, 1 << 63, u64::MAX - 1, u64::MAX] {
            let mut new = sample_job(7, "seed test");
            new.seed = seed;
            let id = jobs::insert_job(&pool, &new).await.unwrap();
            assert_eq!(jobs::get_job(&pool, id).await.unwrap().unwrap().seed, seed);
        }
        // The documented mapping: u64::MAX is stored as -1.
        let stored: i64 = sqlx::query_scalar("SELECT seed FROM jobs ORDER BY id DESC LIMIT 1")
            .fetch_one(pool.pool())
            .await
            .unwrap();
        assert_eq!(stored, -1);
    }

    async fn a_successful_job_records_each_step_of_its_life(pool) {
        let id = jobs::insert_job(&pool, &sample_job(1, "lighthouse"))
            .await
            .unwrap();

        assert!(jobs::set_job_message(&pool, id, 555, 777).await.unwrap());
        assert_eq!(
            jobs::find_job_by_message(&pool, 777)
                .await
                .unwrap()
                .map(|j| j.id),
            Some(id)
        );
        assert_eq!(jobs::find_job_by_message(&pool, 778).await.unwrap(), None);

        assert!(
            !jobs::record_job_progress(&pool, id, 5).await.unwrap(),
            "not running yet"
        );
        assert!(jobs::mark_job_running(&pool, id, "cuda:1").await.unwrap());
        assert!(
            !jobs::mark_job_running(&pool, id, "cuda:0").await.unwrap(),
            "already running"
        );
        assert!(jobs::record_job_progress(&pool, id, 150).await.unwrap());
        let running = jobs::get_job(&pool, id).await.unwrap().unwrap();
        assert_eq!(running.status, JobStatus::Running);
        assert_eq!(running.device.as_deref(), Some("cuda:1"));
        assert_eq!(running.iteration, 150);
        assert!(running.started_at.is_some());
        assert_eq!(running.channel_id, Some(555));

        let output = JobOutput {
            path: PathBuf::from("data/images/1.png"),
            sha256: "ab".repeat(32),
            final_loss: 0.8125,
        };
        assert!(jobs::mark_job_succeeded(&pool, id, None, &output).await.unwrap());
        assert!(
            !jobs::mark_job_failed(&pool, id, None, "late error")
                .await
                .unwrap(),
            "finished jobs stay"
        );
        assert!(!jobs::mark_job_cancelled(&pool, id).await.unwrap());

        let done = jobs::get_job(&pool, id).await.unwrap().unwrap();
        assert_eq!(done.status, JobStatus::Succeeded);
        assert_eq!(done.iteration, done.steps);
        assert_eq!(done.output_path, Some(output.path));
        assert_eq!(done.output_sha256, Some(output.sha256));
        assert_eq!(done.final_loss, Some(0.8125));
        assert_eq!(done.error, None);
        assert!(done.finished_at.unwrap() >= done.started_at.unwrap());
    }

    async fn failed_and_cancelled_jobs_keep_their_reason(pool) {
        let failed = jobs::insert_job(&pool, &sample_job(1, "a")).await.unwrap();
        let cancelled = jobs::insert_job(&pool, &sample_job(1, "b")).await.unwrap();
        jobs::mark_job_running(&pool, failed, "cpu").await.unwrap();

        assert!(
            jobs::mark_job_failed(&pool, failed, None, "CUDA out of memory")
                .await
                .unwrap()
        );
        assert!(jobs::mark_job_cancelled(&pool, cancelled).await.unwrap());
        assert!(
            !jobs::mark_job_running(&pool, cancelled, "cpu")
                .await
                .unwrap()
        );
        let output = JobOutput {
            path: "x.png".into(),
            sha256: "0".repeat(64),
            final_loss: 1.0,
        };
        assert!(
            !jobs::mark_job_succeeded(&pool, failed, None, &output)
                .await
                .unwrap()
        );

        let failed = jobs::get_job(&pool, failed).await.unwrap().unwrap();
        assert_eq!(failed.status, JobStatus::Failed);
        assert_eq!(failed.error.as_deref(), Some("CUDA out of memory"));
        assert!(failed.finished_at.is_some());
        let cancelled = jobs::get_job(&pool, cancelled).await.unwrap().unwrap();
        assert_eq!(cancelled.status, JobStatus::Cancelled);
        assert!(cancelled.finished_at.is_some());
    }

    async fn listings_filter_order_and_count(pool) {
        let mut ids = Vec::new();
        for (i, user) in [10, 20, 10, 10, 20].into_iter().enumerate() {
            ids.push(
                jobs::insert_job(&pool, &sample_job(user, &format!("prompt {i}")))
                    .await
                    .unwrap(),
            );
        }
        jobs::mark_job_running(&pool, ids[1], "cpu").await.unwrap();
        jobs::mark_job_cancelled(&pool, ids[2]).await.unwrap();

        let recent: Vec<JobId> = jobs::list_recent_jobs(&pool, None, 3)
            .await
            .unwrap()
            .iter()
            .map(|j| j.id)
            .collect();
        assert_eq!(recent, [ids[4], ids[3], ids[2]]);
        let queued: Vec<JobId> = jobs::list_recent_jobs(&pool, Some(JobStatus::Queued), 10)
            .await
            .unwrap()
            .iter()
            .map(|j| j.id)
            .collect();
        assert_eq!(queued, [ids[4], ids[3], ids[0]]);
        let user10: Vec<JobId> = jobs::list_jobs_by_requester(&pool, 10, 10)
            .await
            .unwrap()
            .iter()
            .map(|j| j.id)
            .collect();
        assert_eq!(user10, [ids[3], ids[2], ids[0]]);
        let oldest_first: Vec<JobId> = jobs::list_queued_jobs(&pool)
            .await
            .unwrap()
            .iter()
            .map(|j| j.id)
            .collect();
        assert_eq!(oldest_first, [ids[0], ids[3], ids[4]]);
        let counts = jobs::count_jobs_by_status(&pool).await.unwrap();
        assert!(counts.contains(&(JobStatus::Queued, 3)), "{counts:?}");
        assert!(counts.contains(&(JobStatus::Running, 1)), "{counts:?}");
        assert!(counts.contains(&(JobStatus::Cancelled, 1)), "{counts:?}");
    }

    async fn running_jobs_are_requeued_after_a_crash(pool) {
        let a = jobs::insert_job(&pool, &sample_job(1, "a")).await.unwrap();
        let b = jobs::insert_job(&pool, &sample_job(1, "b")).await.unwrap();
        let c = jobs::insert_job(&pool, &sample_job(1, "c")).await.unwrap();
        jobs::mark_job_running(&pool, a, "cuda:0").await.unwrap();
        jobs::mark_job_running(&pool, c, "cuda:1").await.unwrap();

        let recovered = jobs::recover_lost_runs(&pool, LostRuns::SingleHost, 3).await.unwrap();

        assert_eq!(recovered, jobs::Recovered { requeued: vec![a, c], failed: vec![] });
        let queued: Vec<JobId> = jobs::list_queued_jobs(&pool)
            .await
            .unwrap()
            .iter()
            .map(|j| j.id)
            .collect();
        assert_eq!(queued, [a, b, c]);
        let a = jobs::get_job(&pool, a).await.unwrap().unwrap();
        assert_eq!((a.device, a.started_at, a.lost_runs), (None, None, 1));
    }

    async fn a_job_whose_process_dies_under_it_max_attempts_times_fails(pool) {
        let poison = jobs::insert_job(&pool, &sample_job(1, "poison")).await.unwrap();
        let polite = jobs::insert_job(&pool, &sample_job(2, "polite")).await.unwrap();
        // A graceful shutdown's requeue does not count as a lost run.
        for _ in 0..5 {
            jobs::mark_job_running(&pool, polite, "cpu").await.unwrap();
            assert!(jobs::requeue_job(&pool, polite, None).await.unwrap());
        }
        for lost in 1..=3u32 {
            jobs::mark_job_running(&pool, poison, "cpu").await.unwrap();
            let recovered =
                jobs::recover_lost_runs(&pool, LostRuns::SingleHost, 3).await.unwrap();
            let job = jobs::get_job(&pool, poison).await.unwrap().unwrap();
            assert_eq!(job.lost_runs, lost);
            if lost < 3 {
                assert_eq!(recovered.requeued, [poison]);
                assert_eq!(job.status, JobStatus::Queued);
            } else {
                assert_eq!(recovered, jobs::Recovered { requeued: vec![], failed: vec![poison] });
                assert_eq!(job.status, JobStatus::Failed);
                assert!(job.finished_at.is_some());
                let error = job.error.unwrap();
                assert!(error.contains("the worker stopped 3 times"), "{error}");
            }
        }
        let polite = jobs::get_job(&pool, polite).await.unwrap().unwrap();
        assert_eq!((polite.status, polite.lost_runs), (JobStatus::Queued, 0));

        // The same on the shared queue: leases that ran out three times.
        let leased = jobs::insert_job(&pool, &sample_job(3, "leased")).await.unwrap();
        let only_leased = any_model();
        let short = Duration::from_millis(1);
        for lost in 1..=2u32 {
            let claimed = loop {
                let job = workers::claim_next_job(&pool, &format!("w{lost}"), "cpu", short, &only_leased)
                    .await
                    .unwrap()
                    .unwrap();
                if job.id == leased {
                    break job;
                }
                jobs::mark_job_failed(&pool, job.id, Some(&format!("w{lost}")), "not this one").await.unwrap();
            };
            assert_eq!(claimed.attempts, lost);
            tokio::time::sleep(Duration::from_millis(20)).await;
            let recovered = jobs::recover_lost_runs(&pool, LostRuns::ExpiredLeases, 2).await.unwrap();
            if lost < 2 {
                assert_eq!(recovered.requeued, [leased]);
            } else {
                assert_eq!(recovered.failed, [leased]);
            }
        }
        let failed = jobs::get_job(&pool, leased).await.unwrap().unwrap();
        assert_eq!((failed.status, failed.lost_runs), (JobStatus::Failed, 2));
        assert!(failed.error.unwrap().contains("stopped 2 times"));
        // A worker that comes back after its job failed records nothing.
        let output = JobOutput { path: "x.png".into(), sha256: "1".repeat(64), final_loss: 1.0 };
        assert!(!jobs::mark_job_succeeded(&pool, leased, Some("w2"), &output).await.unwrap());
    }

    async fn follow_up_jobs_must_name_an_existing_parent(pool) {
        let parent = jobs::insert_job(&pool, &sample_job(1, "parent"))
            .await
            .unwrap();
        let mut upscale = sample_job(1, "parent");
        upscale.kind = JobKind::Upscale;
        upscale.parent = Some(parent);
        let child = jobs::insert_job(&pool, &upscale).await.unwrap();
        let child = jobs::get_job(&pool, child).await.unwrap().unwrap();
        assert_eq!((child.kind, child.parent), (JobKind::Upscale, Some(parent)));

        upscale.parent = Some(JobId(9_999));
        assert!(
            jobs::insert_job(&pool, &upscale).await.is_err(),
            "foreign keys are enforced"
        );
    }

    async fn eight_concurrent_writers_lose_nothing(pool) {
        const WRITERS: u64 = 8;
        const JOBS_EACH: u64 = 25;

        let tasks: Vec<_> = (0..WRITERS)
            .map(|writer| {
                let pool = pool.clone();
                tokio::spawn(async move {
                    let mut ids = Vec::new();
                    for n in 0..JOBS_EACH {
                        let mut job = sample_job(writer, &format!("writer {writer} job {n}"));
                        job.seed = u64::MAX - n;
                        let id = jobs::insert_job(&pool, &job).await.unwrap();
                        jobs::mark_job_running(&pool, id, "cpu").await.unwrap();
                        jobs::record_job_progress(&pool, id, 1).await.unwrap();
                        ids.push(id);
                    }
                    ids
                })
            })
            .collect();
        let mut all = HashSet::new();
        for task in tasks {
            for id in task.await.unwrap() {
                assert!(all.insert(id), "id {id} handed out twice");
            }
        }

        assert_eq!(all.len() as u64, WRITERS * JOBS_EACH);
        for writer in 0..WRITERS {
            let theirs = jobs::list_jobs_by_requester(&pool, writer, 1000)
                .await
                .unwrap();
            assert_eq!(theirs.len() as u64, JOBS_EACH, "writer {writer}");
            assert!(
                theirs
                    .iter()
                    .all(|j| j.status == JobStatus::Running && j.iteration == 1)
            );
        }
    }

    async fn gallery_posts_and_votes_round_trip_and_rank(pool) {
        let guild = 900;
        let mut posts = Vec::new();
        for n in 0..3 {
            let job = jobs::insert_job(&pool, &sample_job(1, &format!("art {n}")))
                .await
                .unwrap();
            posts.push(
                gallery::insert_gallery_post(&pool, job, guild, 901, 1000 + n)
                    .await
                    .unwrap(),
            );
        }
        let other_job = jobs::insert_job(&pool, &sample_job(1, "elsewhere"))
            .await
            .unwrap();
        gallery::insert_gallery_post(&pool, other_job, 999, 991, 2000)
            .await
            .unwrap();

        let found = gallery::find_gallery_post_by_message(&pool, 1001)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (found.id, found.guild_id, found.channel_id, found.message_id),
            (posts[1], guild, 901, 1001)
        );
        let by_job = gallery::find_gallery_post_by_job(&pool, found.job_id, guild)
            .await
            .unwrap();
        assert_eq!(by_job, Some(found.clone()));
        assert_eq!(
            gallery::find_gallery_post_by_job(&pool, found.job_id, 999)
                .await
                .unwrap(),
            None
        );
        assert!(
            gallery::insert_gallery_post(&pool, found.job_id, guild, 901, 3000)
                .await
                .is_err(),
            "a job is posted once per guild"
        );

        // Votes: two stars on post 1, one on post 2, a non-star on post 0.
        assert!(gallery::add_vote(&pool, posts[1], 50, STAR).await.unwrap());
        assert!(
            !gallery::add_vote(&pool, posts[1], 50, STAR).await.unwrap(),
            "one star per user"
        );
        assert!(gallery::add_vote(&pool, posts[1], 51, STAR).await.unwrap());
        assert!(gallery::add_vote(&pool, posts[2], 50, STAR).await.unwrap());
        assert!(gallery::add_vote(&pool, posts[0], 50, "🔥").await.unwrap());
        assert_eq!(
            gallery::count_votes(&pool, posts[1], STAR).await.unwrap(),
            2
        );
        assert_eq!(
            gallery::count_votes(&pool, posts[0], STAR).await.unwrap(),
            0
        );

        let query = |since: Option<Timestamp>| gallery::GalleryQuery {
            guild_id: guild,
            by_votes: true,
            since,
            author: None,
            text: None,
        };
        let top = gallery::list_gallery(&pool, &query(None), 10, 0)
            .await
            .unwrap();
        let ranking: Vec<_> = top.iter().map(|r| (r.post.id, r.votes)).collect();
        assert_eq!(ranking, [(posts[1], 2), (posts[2], 1), (posts[0], 0)]);
        let page2 = gallery::list_gallery(&pool, &query(None), 2, 2)
            .await
            .unwrap();
        assert_eq!(
            page2.iter().map(|r| r.post.id).collect::<Vec<_>>(),
            [posts[0]]
        );
        let since_later = Timestamp::from_millis(Timestamp::now().as_millis() + 60_000);
        assert!(
            gallery::list_gallery(&pool, &query(Some(since_later)), 10, 0)
                .await
                .unwrap()
                .is_empty()
        );
        let last_day = Timestamp::now().minus(Duration::from_secs(86_400));
        assert_eq!(
            gallery::list_gallery(&pool, &query(Some(last_day)), 10, 0)
                .await
                .unwrap()
                .len(),
            3
        );

        let recent = gallery::list_recent_gallery_posts(&pool, guild, 10, 0)
            .await
            .unwrap();
        assert_eq!(
            recent.iter().map(|p| p.id).collect::<Vec<_>>(),
            [posts[2], posts[1], posts[0]]
        );

        assert!(
            gallery::remove_vote(&pool, posts[1], 51, STAR)
                .await
                .unwrap()
        );
        assert!(
            !gallery::remove_vote(&pool, posts[1], 51, STAR)
                .await
                .unwrap()
        );
        assert_eq!(
            gallery::count_votes(&pool, posts[1], STAR).await.unwrap(),
            1
        );

        assert!(gallery::delete_gallery_post(&pool, posts[1]).await.unwrap());
        assert!(!gallery::delete_gallery_post(&pool, posts[1]).await.unwrap());
        assert_eq!(
            gallery::count_votes(&pool, posts[1], STAR).await.unwrap(),
            0,
            "votes go with the post"
        );
    }

    async fn user_settings_save_and_replace(pool) {
        assert_eq!(
            users::get_user_settings(&pool, u64::MAX).await.unwrap(),
            None
        );
        let mut mine = UserSettings {
            user_id: u64::MAX,
            width: Some(384),
            height: Some(256),
            steps: None,
            vqgan_model: Some("wikiart_f16_16384".into()),
            clip_model: None,
            ping_on_completion: true,
            grid: Some(4),
            remix: true,
        };
        users::save_user_settings(&pool, &mine).await.unwrap();
        assert_eq!(
            users::get_user_settings(&pool, u64::MAX).await.unwrap(),
            Some(mine.clone())
        );

        mine.steps = Some(200);
        mine.width = None;
        mine.ping_on_completion = false;
        mine.grid = None;
        users::save_user_settings(&pool, &mine).await.unwrap();
        assert_eq!(
            users::get_user_settings(&pool, u64::MAX).await.unwrap(),
            Some(mine)
        );
    }

    async fn bans_are_per_guild(pool) {
        assert!(
            users::ban_user(&pool, 1, 42, 7, Some("spam"))
                .await
                .unwrap()
        );
        assert!(
            !users::ban_user(&pool, 1, 42, 8, None).await.unwrap(),
            "first ban kept"
        );
        assert!(users::ban_user(&pool, 1, 43, 7, None).await.unwrap());

        let ban = users::find_ban(&pool, 1, 42)
            .await
            .unwrap()
            .expect("banned in guild 1");
        assert_eq!((ban.guild_id, ban.user_id, ban.banned_by), (1, 42, 7));
        assert_eq!(ban.reason.as_deref(), Some("spam"));
        assert_eq!(
            users::find_ban(&pool, 2, 42).await.unwrap(),
            None,
            "not in guild 2"
        );
        let mut banned: Vec<u64> = users::list_bans(&pool, 1)
            .await
            .unwrap()
            .iter()
            .map(|b| b.user_id)
            .collect();
        banned.sort_unstable();
        assert_eq!(banned, [42, 43]);

        assert!(users::unban_user(&pool, 1, 42).await.unwrap());
        assert!(!users::unban_user(&pool, 1, 42).await.unwrap());
        assert_eq!(users::find_ban(&pool, 1, 42).await.unwrap(), None);
    }

    async fn guild_gallery_channel_is_set_and_cleared(pool) {
        assert_eq!(guilds::get_guild_settings(&pool, 5).await.unwrap(), None);
        guilds::set_gallery_channel(&pool, 5, Some(u64::MAX))
            .await
            .unwrap();
        let set = guilds::get_guild_settings(&pool, 5).await.unwrap().unwrap();
        assert_eq!((set.guild_id, set.gallery_channel_id), (5, Some(u64::MAX)));
        guilds::set_gallery_channel(&pool, 5, None).await.unwrap();
        assert_eq!(
            guilds::get_guild_settings(&pool, 5)
                .await
                .unwrap()
                .unwrap()
                .gallery_channel_id,
            None
        );
    }

    async fn pausing_a_guild_or_setting_its_grid_keeps_its_gallery_channel(pool) {
        guilds::set_gallery_channel(&pool, 5, Some(9))
            .await
            .unwrap();
        guilds::set_guild_paused(&pool, 5, true).await.unwrap();
        guilds::set_guild_paused(&pool, 6, true).await.unwrap();
        guilds::set_guild_grid(&pool, 5, Some(4)).await.unwrap();
        let s = guilds::get_guild_settings(&pool, 5).await.unwrap().unwrap();
        assert_eq!((s.gallery_channel_id, s.paused, s.grid), (Some(9), true, Some(4)));
        guilds::set_guild_grid(&pool, 5, None).await.unwrap();
        let s = guilds::get_guild_settings(&pool, 5).await.unwrap().unwrap();
        assert_eq!((s.paused, s.grid), (true, None));
        let mut paused = guilds::list_paused_guilds(&pool).await.unwrap();
        paused.sort_unstable();
        assert_eq!(paused, [5, 6]);
        guilds::set_guild_paused(&pool, 5, false).await.unwrap();
        assert_eq!(guilds::list_paused_guilds(&pool).await.unwrap(), [6]);
    }

    async fn result_messages_find_their_job_and_jobs_are_counted_per_hour(pool) {
        let a = jobs::insert_job(&pool, &sample_job(7, "a")).await.unwrap();
        let b = jobs::insert_job(&pool, &sample_job(7, "b")).await.unwrap();
        jobs::insert_job(&pool, &sample_job(8, "c")).await.unwrap();
        assert_eq!(jobs::get_job_result(&pool, a).await.unwrap(), None);
        jobs::set_job_result(&pool, a, 900, u64::MAX).await.unwrap();
        assert_eq!(
            jobs::get_job_result(&pool, a).await.unwrap(),
            Some((900, u64::MAX))
        );
        let found = jobs::find_job_by_result_message(&pool, u64::MAX)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(found.id, a);
        assert!(
            jobs::find_job_by_result_message(&pool, 1)
                .await
                .unwrap()
                .is_none()
        );
        // The same message cannot carry two jobs' results.
        assert!(jobs::set_job_result(&pool, b, 900, u64::MAX).await.is_err());

        let hour_ago = Timestamp::now().minus(Duration::from_secs(3600));
        assert_eq!(jobs::count_jobs_since(&pool, 7, hour_ago).await.unwrap(), 2);
        assert_eq!(jobs::count_jobs_since(&pool, 9, hour_ago).await.unwrap(), 0);
        let future = Timestamp::from_millis(Timestamp::now().as_millis() + 60_000);
        assert_eq!(jobs::count_jobs_since(&pool, 7, future).await.unwrap(), 0);
    }

    async fn gallery_listings_filter_by_author_and_text_and_rank_by_votes(pool) {
        let mut posts = Vec::new();
        for (i, (user, prompt)) in [(1, "a red fox"), (2, "100% fox_like"), (1, "a blue whale")]
            .into_iter()
            .enumerate()
        {
            let job = jobs::insert_job(&pool, &sample_job(user, prompt))
                .await
                .unwrap();
            posts.push(
                gallery::insert_gallery_post(&pool, job, 5, 9, 100 + i as u64)
                    .await
                    .unwrap(),
            );
        }
        for voter in [10, 11] {
            gallery::add_vote(&pool, posts[1], voter, STAR)
                .await
                .unwrap();
        }
        gallery::add_vote(&pool, posts[2], 10, STAR).await.unwrap();
        let list = |query: gallery::GalleryQuery| {
            let pool = pool.clone();
            async move {
                gallery::list_gallery(&pool, &query, 10, 0)
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|e| (e.prompt, e.votes))
                    .collect::<Vec<_>>()
            }
        };
        let base = gallery::GalleryQuery {
            guild_id: 5,
            by_votes: false,
            since: None,
            author: None,
            text: None,
        };
        let newest = list(base.clone()).await;
        assert_eq!(newest.len(), 3);
        let top = list(gallery::GalleryQuery {
            by_votes: true,
            ..base.clone()
        })
        .await;
        assert_eq!(
            top,
            [
                ("100% fox_like".to_owned(), 2),
                ("a blue whale".to_owned(), 1),
                ("a red fox".to_owned(), 0)
            ]
        );
        let mine = list(gallery::GalleryQuery {
            author: Some(1),
            ..base.clone()
        })
        .await;
        assert_eq!(mine.len(), 2);
        // Search text is literal: % and _ match only themselves; case does not matter.
        let found = list(gallery::GalleryQuery {
            text: Some("0% FOX_".into()),
            ..base.clone()
        })
        .await;
        assert_eq!(found, [("100% fox_like".to_owned(), 2)]);
        let none = list(gallery::GalleryQuery {
            text: Some("d_f".into()),
            ..base.clone()
        })
        .await;
        assert!(none.is_empty(), "{none:?}");
        let other_guild = list(gallery::GalleryQuery {
            guild_id: 6,
            ..base
        })
        .await;
        assert!(other_guild.is_empty());
    }
}

/// Claims under `worker` until nothing is left, returning the requesters in claim order.
async fn claim_all(pool: &store::Store, worker: &str, filter: &workers::ClaimFilter) -> Vec<u64> {
    let mut order = Vec::new();
    while let Some(job) = workers::claim_next_job(pool, worker, "cpu", LEASE, filter)
        .await
        .unwrap()
    {
        assert_eq!(job.status, JobStatus::Running);
        assert_eq!(job.worker.as_deref(), Some(worker));
        order.push(job.requester_id);
        // Finish it at once, so the running cap never holds anyone back.
        let output = JobOutput {
            path: "x.png".into(),
            sha256: "0".repeat(64),
            final_loss: 0.0,
        };
        assert!(
            jobs::mark_job_succeeded(pool, job.id, Some(worker), &output)
                .await
                .unwrap()
        );
    }
    order
}

const LEASE: Duration = Duration::from_secs(60);

fn any_model() -> workers::ClaimFilter {
    workers::ClaimFilter {
        vqgan_models: None,
        clip_models: None,
        max_running_per_user: 1,
        prioritize_follow_ups: true,
    }
}

on_both_backends! {
    async fn claims_take_turns_between_users_and_put_follow_ups_first(pool) {
        // User 1 queues three jobs before users 2 and 3 queue one each.
        for (user, prompt) in [(1, "a"), (1, "b"), (1, "c"), (2, "d"), (3, "e")] {
            jobs::insert_job(&pool, &sample_job(user, prompt)).await.unwrap();
        }
        let first = claim_all(&pool, "w1", &any_model()).await;
        // Round-robin over users, each user's jobs in order: as the single-host queue.
        assert_eq!(first, [1, 2, 3, 1, 1]);

        // A follow-up of user 3 jumps ahead of user 4's fresh job, but only when configured.
        let parent = jobs::list_jobs_by_requester(&pool, 3, 1).await.unwrap()[0].id;
        jobs::insert_job(&pool, &sample_job(4, "fresh")).await.unwrap();
        let mut upscale = sample_job(3, "e");
        upscale.kind = JobKind::Upscale;
        upscale.parent = Some(parent);
        jobs::insert_job(&pool, &upscale).await.unwrap();
        assert_eq!(claim_all(&pool, "w1", &any_model()).await, [3, 4]);
        jobs::insert_job(&pool, &sample_job(5, "fresh")).await.unwrap();
        jobs::insert_job(&pool, &upscale).await.unwrap();
        let in_order = workers::ClaimFilter { prioritize_follow_ups: false, ..any_model() };
        assert_eq!(claim_all(&pool, "w1", &in_order).await, [5, 3]);
    }

    async fn a_worker_claims_a_batch_of_jobs_that_agree_in_one_claim(pool) {
        // Users 1–4 queue jobs; user 3's is another size, user 4's another CLIP, user 1 queues two.
        let a = jobs::insert_job(&pool, &sample_job(1, "a")).await.unwrap();
        let b = jobs::insert_job(&pool, &sample_job(2, "b")).await.unwrap();
        let mut other_size = sample_job(3, "c");
        other_size.width *= 2;
        let c = jobs::insert_job(&pool, &other_size).await.unwrap();
        let mut other_clip = sample_job(4, "d");
        other_clip.clip_model = "vit_l14".into();
        jobs::insert_job(&pool, &other_clip).await.unwrap();
        let a2 = jobs::insert_job(&pool, &sample_job(1, "a2")).await.unwrap();
        let e = jobs::insert_job(&pool, &sample_job(5, "e")).await.unwrap();
        let batch = workers::claim_batch(&pool, "w1", "cuda:0", LEASE, &any_model(), (4, u64::MAX))
            .await
            .unwrap();
        // The first in turn, then those that can share its batch in turn; user 1's second waits
        // (one running job each), as do the other size and the other CLIP.
        let ids: Vec<_> = batch.iter().map(|j| j.id).collect();
        assert_eq!(ids, [a, b, e]);
        for job in &batch {
            assert_eq!((job.status, job.worker.as_deref(), job.device.as_deref()),
                       (JobStatus::Running, Some("w1"), Some("cuda:0")));
        }
        assert_eq!(jobs::get_job(&pool, a2).await.unwrap().unwrap().status, JobStatus::Queued);
        // Another worker's batch starts with the next in turn: the other size, alone.
        let next = workers::claim_batch(&pool, "w2", "cuda:0", LEASE, &any_model(), (4, u64::MAX))
            .await
            .unwrap();
        assert_eq!(next.iter().map(|j| j.id).collect::<Vec<_>>(), [c]);
        // A batch of one is the plain claim.
        let one = workers::claim_batch(&pool, "w3", "cpu", LEASE, &any_model(), (1, u64::MAX)).await.unwrap();
        assert_eq!(one.len(), 1);
        // A pixel budget: a grid of four counts four images; a job beyond it stays queued, its
        // claim taken back (no attempt counted).
        let mut grid = sample_job(6, "grid");
        grid.params["grid"] = serde_json::json!(4);
        let g = jobs::insert_job(&pool, &grid).await.unwrap();
        let after = jobs::insert_job(&pool, &sample_job(7, "after")).await.unwrap();
        let small = 256 * 256;
        let limited = workers::claim_batch(&pool, "w4", "cpu", LEASE, &any_model(), (4, 4 * small))
            .await
            .unwrap();
        assert_eq!(limited.iter().map(|j| (j.id, j.pixels())).collect::<Vec<_>>(), [(g, 4 * small)]);
        let left = jobs::get_job(&pool, after).await.unwrap().unwrap();
        assert_eq!((left.status, left.attempts, left.worker), (JobStatus::Queued, 0, None));
        assert!(workers::claim_batch(&pool, "w3", "cpu", LEASE, &any_model(), (0, u64::MAX)).await.unwrap().is_empty());
    }

    async fn claims_skip_models_paused_guilds_and_users_at_their_cap(pool) {
        let mut other_model = sample_job(1, "needs vqgan b");
        other_model.vqgan_model = "gumbel_f8_8192".into();
        let other = jobs::insert_job(&pool, &other_model).await.unwrap();
        let mut paused = sample_job(2, "paused guild");
        paused.guild_id = Some(77);
        jobs::insert_job(&pool, &paused).await.unwrap();
        guilds::set_guild_paused(&pool, 77, true).await.unwrap();
        let a1 = jobs::insert_job(&pool, &sample_job(3, "a1")).await.unwrap();
        let a2 = jobs::insert_job(&pool, &sample_job(3, "a2")).await.unwrap();
        let only_imagenet = workers::ClaimFilter {
            vqgan_models: Some(vec!["imagenet_f16_16384".into()]),
            clip_models: Some(vec!["vit_b32".into(), "vit_b16".into()]),
            ..any_model()
        };

        let got = workers::claim_next_job(&pool, "w1", "cuda:0", LEASE, &only_imagenet)
            .await
            .unwrap()
            .map(|j| j.id);
        assert_eq!(got, Some(a1));
        // User 3 is at the cap of one running job; the rest is filtered or paused.
        let none = workers::claim_next_job(&pool, "w1", "cuda:1", LEASE, &only_imagenet)
            .await
            .unwrap();
        assert_eq!(none.map(|j| j.id), None);
        let nothing = workers::ClaimFilter { vqgan_models: Some(Vec::new()), ..any_model() };
        assert!(workers::claim_next_job(&pool, "w1", "cpu", LEASE, &nothing).await.unwrap().is_none());
        // A worker that has the other model takes it.
        let got = workers::claim_next_job(&pool, "w2", "cpu", LEASE, &any_model())
            .await
            .unwrap()
            .unwrap();
        assert_eq!((got.id, got.device.as_deref(), got.attempts), (other, Some("cpu"), 1));
        guilds::set_guild_paused(&pool, 77, false).await.unwrap();
        let got = workers::claim_next_job(&pool, "w2", "cpu", LEASE, &any_model())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.requester_id, 2);
        assert_eq!(jobs::get_job(&pool, a2).await.unwrap().unwrap().status, JobStatus::Queued);
    }

    async fn expired_leases_requeue_and_only_the_owner_records_a_result(pool) {
        let id = jobs::insert_job(&pool, &sample_job(1, "lease")).await.unwrap();
        let short = Duration::from_millis(300);
        let job = workers::claim_next_job(&pool, "dead", "cuda:0", short, &any_model())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(job.id, id);
        // Only the jobs the worker names are renewed (one whose end it failed to record is not).
        assert!(workers::renew_leases(&pool, "dead", &[], short).await.unwrap().is_empty());
        let other = JobId(id.0 + 1000);
        assert_eq!(workers::renew_leases(&pool, "dead", &[other], short).await.unwrap(), []);
        assert_eq!(workers::renew_leases(&pool, "dead", &[id], short).await.unwrap(), [id]);
        let details = events::ProgressDetails {
            loss: 1.5,
            elapsed_ms: 1200,
            eta_ms: 800,
            preview_iteration: Some(3),
            preview_size: Some((64, 48)),
        };
        assert!(events::record_progress(&pool, id, Some("dead"), 3, &details).await.unwrap());
        assert!(!events::record_progress(&pool, id, Some("other"), 4, &details).await.unwrap());
        assert_eq!(events::get_progress(&pool, id).await.unwrap(), Some(details));
        events::put_job_file(&pool, id, events::PREVIEW, b"jpeg").await.unwrap();
        assert!(events::has_job_file(&pool, id, events::PREVIEW).await.unwrap());
        assert_eq!(
            events::get_job_file(&pool, id, events::PREVIEW).await.unwrap().as_deref(),
            Some(&b"jpeg"[..])
        );
        assert_eq!(events::get_job_file(&pool, id, events::IMAGE).await.unwrap(), None);
        let expired = || jobs::recover_lost_runs(&pool, LostRuns::ExpiredLeases, 3);
        assert_eq!(expired().await.unwrap(), jobs::Recovered::default(), "not expired yet");
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(expired().await.unwrap().requeued, [id]);
        let queued = jobs::get_job(&pool, id).await.unwrap().unwrap();
        assert_eq!((queued.status, queued.worker, queued.device), (JobStatus::Queued, None, None));
        assert_eq!(events::get_progress(&pool, id).await.unwrap(), None, "a new run starts afresh");

        let again = workers::claim_next_job(&pool, "alive", "cuda:1", LEASE, &any_model())
            .await
            .unwrap()
            .unwrap();
        assert_eq!((again.id, again.attempts), (id, 2));
        // The dead worker comes back: it holds nothing, and cannot record over the new run.
        assert!(workers::renew_leases(&pool, "dead", &[id], LEASE).await.unwrap().is_empty());
        let output = JobOutput { path: "x.png".into(), sha256: "1".repeat(64), final_loss: 1.0 };
        assert!(!jobs::mark_job_succeeded(&pool, id, Some("dead"), &output).await.unwrap());
        assert!(!jobs::mark_job_failed(&pool, id, Some("dead"), "late").await.unwrap());
        assert!(!jobs::requeue_job(&pool, id, Some("dead")).await.unwrap());
        assert!(!jobs::mark_job_succeeded(&pool, id, None, &output).await.unwrap());
        assert!(jobs::mark_job_succeeded(&pool, id, Some("alive"), &output).await.unwrap());
        assert!(!jobs::mark_job_succeeded(&pool, id, Some("alive"), &output).await.unwrap(), "one result");
        let done = jobs::get_job(&pool, id).await.unwrap().unwrap();
        assert_eq!((done.status, done.worker.as_deref()), (JobStatus::Succeeded, Some("alive")));
        // A single-host restart leaves claimed jobs to their leases.
        let other = jobs::insert_job(&pool, &sample_job(2, "claimed")).await.unwrap();
        workers::claim_next_job(&pool, "alive", "cpu", LEASE, &any_model()).await.unwrap();
        let single = jobs::recover_lost_runs(&pool, LostRuns::SingleHost, 3).await.unwrap();
        assert_eq!(single, jobs::Recovered::default());
        assert_eq!(jobs::get_job(&pool, other).await.unwrap().unwrap().status, JobStatus::Running);
    }

    async fn workers_register_heartbeat_stop_and_list_their_jobs(pool) {
        let devices = vec!["cuda:0".to_owned(), "cuda:1".to_owned()];
        workers::register_worker(&pool, "gpu1-10-1", "gpu1", &devices).await.unwrap();
        workers::register_worker(&pool, "gpu2-20-1", "gpu2", &devices[..1]).await.unwrap();
        let id = jobs::insert_job(&pool, &sample_job(1, "x")).await.unwrap();
        workers::claim_next_job(&pool, "gpu2-20-1", "cuda:0", LEASE, &any_model()).await.unwrap();
        assert!(workers::heartbeat_worker(&pool, "gpu1-10-1").await.unwrap());
        assert!(!workers::heartbeat_worker(&pool, "nobody").await.unwrap());
        workers::stop_worker(&pool, "gpu1-10-1").await.unwrap();

        let list = workers::list_workers(&pool, Timestamp::from_millis(0)).await.unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!((list[0].host.as_str(), list[0].devices.clone()), ("gpu1", devices.clone()));
        assert_eq!(list[1].running, [id]);
        assert_eq!(list[1].pid, std::process::id());
        let now = Timestamp::now();
        assert_eq!(list[0].state(now, LEASE), workers::WorkerState::Stopped);
        assert_eq!(list[1].state(now, LEASE), workers::WorkerState::Live);
        let later = Timestamp::from_millis(now.as_millis() + 61_000);
        assert_eq!(list[1].state(later, LEASE), workers::WorkerState::Lost);
        let recent = workers::list_workers(&pool, Timestamp::from_millis(now.as_millis() + 1000)).await.unwrap();
        assert!(recent.is_empty());
    }

    async fn concurrent_claimers_never_take_the_same_job(pool) {
        const JOBS: u64 = 60;
        for n in 0..JOBS {
            jobs::insert_job(&pool, &sample_job(n % 6, &format!("job {n}"))).await.unwrap();
        }
        let filter = workers::ClaimFilter { max_running_per_user: 1000, ..any_model() };
        let tasks: Vec<_> = (0..8)
            .map(|w| {
                let pool = pool.clone();
                let filter = filter.clone();
                tokio::spawn(async move {
                    let name = format!("w{w}");
                    let mut got = Vec::new();
                    while let Some(job) = workers::claim_next_job(&pool, &name, "cpu", LEASE, &filter)
                        .await
                        .unwrap()
                    {
                        got.push((job.id, name.clone()));
                    }
                    got
                })
            })
            .collect();
        let mut seen = HashSet::new();
        for task in tasks {
            for (id, worker) in task.await.unwrap() {
                assert!(seen.insert(id), "job {id} claimed twice");
                let job = jobs::get_job(&pool, id).await.unwrap().unwrap();
                assert_eq!((job.worker, job.attempts), (Some(worker), 1));
            }
        }
        assert_eq!(seen.len() as u64, JOBS);
    }
}

on_both_backends! {
    async fn concurrent_claimers_respect_the_running_cap(pool) {
        for n in 0..24 {
            jobs::insert_job(&pool, &sample_job(n % 6, &format!("job {n}"))).await.unwrap();
        }
        let tasks: Vec<_> = (0..8)
            .map(|w| {
                let pool = pool.clone();
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    while let Some(job) =
                        workers::claim_next_job(&pool, &format!("w{w}"), "cpu", LEASE, &any_model())
                            .await
                            .unwrap()
                    {
                        got.push(job.requester_id);
                    }
                    got
                })
            })
            .collect();
        let mut users = Vec::new();
        for task in tasks {
            users.extend(task.await.unwrap());
        }
        users.sort_unstable();
        // One running job per user, however the claims interleave.
        assert_eq!(users, [0, 1, 2, 3, 4, 5]);
    }
}

#[tokio::test]
async fn job_announcements_reach_listeners_on_postgres_and_sqlite_followers_poll() {
    let (_guard, db) = crate::support::test_db(Backend::Postgres).await;
    let mut listener = events::Listener::connect(&db, events::CHANNEL)
        .await
        .unwrap();
    let mut queue = events::Listener::connect(&db, events::QUEUE_CHANNEL)
        .await
        .unwrap();
    events::notify(&db, JobId(42)).await.unwrap();
    events::notify_queued(&db, JobId(43)).await.unwrap();
    let heard = tokio::time::timeout(Duration::from_secs(10), listener.next())
        .await
        .expect("the announcement arrives");
    assert_eq!(heard, Some(JobId(42)), "each channel hears only its own");
    let heard = tokio::time::timeout(Duration::from_secs(10), queue.next())
        .await
        .expect("the announcement arrives");
    assert_eq!(heard, Some(JobId(43)));

    let (_dir, db) = test_pool().await;
    let mut listener = events::Listener::connect(&db, events::CHANNEL)
        .await
        .unwrap();
    events::notify(&db, JobId(42)).await.unwrap();
    let heard = tokio::time::timeout(Duration::from_millis(200), listener.next()).await;
    assert!(heard.is_err(), "SQLite has no notifications");
}

/// A pool that timed out says only that; `describe` finds and names the cause, with the
/// database's address but never its password.
#[tokio::test]
async fn a_timed_out_pool_is_explained_by_its_cause() {
    let server = crate::postgres::PrivateServer::start();
    let mut url = server.new_database().await;
    url.set_password(Some("s3cret-pw")).unwrap();
    let location = store::Location::Postgres(url);
    // Trust authentication: the password is sent nowhere that matters, and must show nowhere.
    let db = store::connect(&location).await.unwrap();
    let healthy = db.describe(&sqlx::Error::PoolTimedOut).await;
    assert!(healthy.contains("stayed busy"), "{healthy}");
    server.stop();
    let down = db.describe(&sqlx::Error::PoolTimedOut).await;
    assert!(
        down.contains(&format!("cannot reach the PostgreSQL database {location}"))
            && down.contains("Connection refused"),
        "{down}"
    );
    let wrapped = anyhow::Error::new(sqlx::Error::PoolTimedOut).context("cannot claim jobs");
    let explained = db.describe(wrapped.as_ref()).await;
    assert!(
        explained.starts_with("cannot reach") && explained.contains("Connection refused"),
        "{explained}"
    );
    let other = db.describe(&sqlx::Error::RowNotFound).await;
    assert!(
        other.contains("no rows returned") && other.contains("database"),
        "{other}"
    );
    for message in [healthy, down, explained, other] {
        assert!(!message.contains("s3cret-pw"), "{message}");
    }
}
