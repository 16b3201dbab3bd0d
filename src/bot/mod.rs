//! The Discord bot: poise commands on serenity, talking to the [`Scheduler`].
//!
//! Files, each importing only those listed before it (and this one):
//! - [`text`], [`components`], [`checks`], [`options`]: leaves — what messages say, the buttons
//!   and their `custom_id` codec, who may do what, the values users pick (autocomplete, sizes,
//!   aspects, saved defaults).
//! - [`gallery`]: posting finished pictures to a guild's gallery channel, ⭐ votes, its pages.
//! - [`safety`]: the safety check of a result before it is posted (spoiler, withheld, or
//!   plain), scored by [`crate::inspect`].
//! - [`progress`]: one task per job owning its message: throttled edits while it runs (with the
//!   interaction token while it is fresh, the bot token after), then the result with buttons.
//! - [`submit`]: submitting a job and tracking its message, for commands, buttons and reactions.
//! - [`interactions`]: the buttons and reactions (rerun, upscale, variation, time-lapse, cancel),
//!   answered from the database so they survive restarts.
//! - [`commands`]: `/imagine`, `/queue`, `/cancel`, `/job`, `/history`, `/gallery`, `/settings`
//!   (per-user defaults), `/admin` (moderators), `/help`, one file per family, and the list of
//!   every command.
//!
//! This is the only module that knows Discord. It reaches the engine only through the
//! scheduler, and the database for job records.

pub(crate) mod checks;
pub(crate) mod commands;
pub(crate) mod components;
pub(crate) mod gallery;
pub(crate) mod interactions;
pub(crate) mod options;
pub(crate) mod progress;
pub(crate) mod prompt_help;
pub(crate) mod safety;
pub(crate) mod submit;
pub(crate) mod text;
pub(crate) mod upload;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use crate::store::Store;
use anyhow::Context as _;
use poise::serenity_prelude as serenity;

use crate::config::Settings;
use crate::engine::nets::tokenizer::ClipTokenizer;
use crate::jobs::Scheduler;

/// What every command can reach; cheap handles only, nothing mutable of its own.
pub struct Data {
    /// The job queue.
    pub scheduler: Scheduler,
    /// The database.
    pub store: Store,
    /// The validated configuration.
    pub settings: Arc<Settings>,
    /// Prompt tokenizer (to count and cut prompts before queueing).
    pub tokenizer: Arc<ClipTokenizer>,
    /// CLIP on this process's CPU: `/describe` and the safety check of results.
    pub inspector: Arc<crate::inspect::Inspector>,
    /// One `/describe` per user every few seconds.
    pub(crate) describe_cooldown: checks::Cooldown,
    /// The member names last recorded, so an interaction writes one only when it changed.
    pub(crate) names_seen: Arc<std::sync::Mutex<HashMap<(u64, u64), String>>>,
}

/// Most member names kept in [`Data::names_seen`] (forgotten all at once beyond: they are
/// recorded again at most once each).
const NAMES_SEEN: usize = 50_000;

/// A command's error: shown to the user when it is about their request, logged otherwise.
#[derive(Debug, thiserror::Error)]
pub enum BotError {
    /// Something the user can fix; the text is shown to them.
    #[error("{0}")]
    User(String),
    /// Anything else; the user sees only that something went wrong.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl From<serenity::Error> for BotError {
    fn from(e: serenity::Error) -> Self {
        Self::Internal(e.into())
    }
}

impl From<sqlx::Error> for BotError {
    fn from(e: sqlx::Error) -> Self {
        Self::Internal(e.into())
    }
}

/// The poise context every command gets.
pub type Context<'a> = poise::Context<'a, Data, BotError>;

/// The gateway intents the bot needs: guilds, and reactions in guilds and DMs. Slash commands
/// need none; message content is never read.
pub fn intents() -> serenity::GatewayIntents {
    serenity::GatewayIntents::GUILDS
        | serenity::GatewayIntents::GUILD_MESSAGE_REACTIONS
        | serenity::GatewayIntents::DIRECT_MESSAGE_REACTIONS
}

/// The REST client: to Discord, or through `discord.api_base` when it points elsewhere (a
/// rate-limit proxy, or the fake Discord in tests), which then does the rate limiting.
pub(crate) fn http_client(settings: &Settings) -> anyhow::Result<serenity::Http> {
    let token = settings
        .require_token()
        .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
    let mut builder = serenity::HttpBuilder::new(secrecy::ExposeSecret::expose_secret(token));
    let base = settings.discord.api_base.as_str().trim_end_matches('/');
    if base != "https://discord.com" {
        // serenity ignores a proxy while its own rate limiter is on.
        builder = builder.proxy(base).ratelimiter_disabled(true);
    }
    Ok(builder.build())
}

/// A reply only the requester sees, with every mention disabled.
pub(crate) fn private_reply(text: impl Into<String>) -> poise::CreateReply {
    poise::CreateReply::default()
        .content(text)
        .ephemeral(true)
        .allowed_mentions(serenity::CreateAllowedMentions::new())
}

/// Answers errors: the user's own mistakes privately and in full; internal failures in the log,
/// with only a short apology to the user.
async fn on_error(error: poise::FrameworkError<'_, Data, BotError>) {
    match error {
        poise::FrameworkError::Command { error, ctx, .. } => {
            let text = match &error {
                BotError::User(message) => message.clone(),
                BotError::Internal(_) => {
                    "Something went wrong on our side; it has been logged.".to_owned()
                }
            };
            if let Err(e) = ctx.send(private_reply(text)).await {
                tracing::warn!(error = %e, "cannot report an error to the user");
            }
            // After the answer: naming the cause of a database timeout takes a connection try.
            if let BotError::Internal(e) = &error {
                let described = ctx.data().store.describe(e.as_ref()).await;
                tracing::error!(command = %ctx.command().name, error = %described, "command failed");
            }
        }
        // Options Discord itself would never send (a required one missing, a wrong type): a
        // hostile or outdated client. Answered privately, as any mistake.
        poise::FrameworkError::CommandStructureMismatch {
            description, ctx, ..
        } => {
            tracing::warn!(command = %ctx.command().name, %description, "options that do not fit the command");
            let text = format!(
                "/{} did not get the options it needs ({description}).",
                ctx.command().name
            );
            if let Err(e) = poise::Context::Application(ctx)
                .send(private_reply(text))
                .await
            {
                tracing::warn!(error = %e, "cannot report an error to the user");
            }
        }
        poise::FrameworkError::ArgumentParse { error, ctx, .. } => {
            let text = format!("/{}: {error}", ctx.command().name);
            if let Err(e) = ctx.send(private_reply(text)).await {
                tracing::warn!(error = %e, "cannot report an error to the user");
            }
        }
        other => {
            if let Err(e) = poise::builtins::on_error(other).await {
                tracing::warn!(error = %e, "error while handling an error");
            }
        }
    }
}

/// Everything that is not a slash command: button presses and reactions.
async fn on_event(
    framework: poise::FrameworkContext<'_, Data, BotError>,
    event: &serenity::FullEvent,
) -> Result<(), BotError> {
    let ctx = framework.serenity_context;
    let data = framework.user_data;
    remember_names(data, event);
    match event {
        serenity::FullEvent::InteractionCreate {
            interaction: serenity::Interaction::Component(press),
        } => interactions::on_component(ctx, data, press).await,
        serenity::FullEvent::InteractionCreate {
            interaction: serenity::Interaction::Modal(form),
        } => interactions::on_modal(ctx, data, form).await,
        serenity::FullEvent::ReactionAdd { add_reaction } => {
            interactions::on_reaction_add(ctx, data, framework.bot_id(), add_reaction).await
        }
        serenity::FullEvent::ReactionRemove { removed_reaction } => {
            interactions::on_reaction_remove(data, removed_reaction).await
        }
        serenity::FullEvent::Ratelimit { data } => {
            crate::metrics::global()
                .discord_ratelimits
                .get_or_create(&crate::metrics::RouteLabels {
                    method: format!("{:?}", data.method).to_uppercase(),
                    route: data.path.clone(),
                })
                .inc();
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Records the names the web gallery shows (a member's display name in the guild they
/// interact in, a guild's name when the bot joins or it is renamed), in the background: the
/// event's own handling does not wait for the database.
fn remember_names(data: &Data, event: &serenity::FullEvent) {
    use crate::store::names;
    let store = data.store.clone();
    match event {
        serenity::FullEvent::InteractionCreate { interaction } => {
            let (guild, member) = match interaction {
                serenity::Interaction::Command(c) => (c.guild_id, c.member.as_deref()),
                serenity::Interaction::Component(c) => (c.guild_id, c.member.as_ref()),
                serenity::Interaction::Modal(m) => (m.guild_id, m.member.as_ref()),
                _ => (None, None),
            };
            let (Some(guild), Some(member)) = (guild, member) else {
                return;
            };
            let key = (guild.get(), member.user.id.get());
            let name = member.display_name().to_owned();
            {
                let mut seen = data
                    .names_seen
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if seen.get(&key) == Some(&name) {
                    return;
                }
                if seen.len() >= NAMES_SEEN {
                    seen.clear();
                }
                seen.insert(key, name.clone());
            }
            let seen = data.names_seen.clone();
            tokio::spawn(async move {
                if let Err(e) = names::record_member_name(&store, key.0, key.1, &name).await {
                    tracing::warn!(error = %e, "cannot record a member's name");
                    // Tried again at their next interaction.
                    seen.lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .remove(&key);
                }
            });
        }
        serenity::FullEvent::GuildCreate { guild, .. } => {
            remember_guild_name(store, guild.id, guild.name.clone());
        }
        serenity::FullEvent::GuildUpdate { new_data, .. } => {
            remember_guild_name(store, new_data.id, new_data.name.clone());
        }
        _ => {}
    }
}

fn remember_guild_name(store: Store, guild: serenity::GuildId, name: String) {
    tokio::spawn(async move {
        if let Err(e) = crate::store::names::record_guild_name(&store, guild.get(), &name).await {
            tracing::warn!(error = %e, "cannot record a guild's name");
        }
    });
}

/// The bot's gateway connection, for the health check: empty until the client exists.
#[derive(Clone, Default)]
pub struct Gateway(Arc<std::sync::OnceLock<Arc<::serenity::gateway::ShardManager>>>);

impl Gateway {
    /// Whether a shard is connected to Discord's gateway now.
    pub async fn connected(&self) -> bool {
        let Some(shards) = self.0.get() else {
            return false;
        };
        shards
            .runners
            .lock()
            .await
            .values()
            .any(|r| r.stage == ::serenity::gateway::ConnectionStage::Connected)
    }
}

/// Runs the bot until `shutdown` resolves or the gateway connection ends for good; `gateway`
/// reports its connection meanwhile.
pub async fn run(
    settings: Arc<Settings>,
    store: Store,
    scheduler: Scheduler,
    gateway: Gateway,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let http = http_client(&settings)?;
    // serenity falls back to Discord's real gateway when this call fails, and retries forever:
    // check first, so a wrong api_base or an unreachable Discord is a clear error instead.
    let base = settings.discord.api_base.as_str();
    http.get_gateway()
        .await
        .with_context(|| format!("cannot reach Discord at {base} (discord.api_base)"))?;
    let tokenizer = Arc::new(ClipTokenizer::new());
    let data = Data {
        scheduler,
        store,
        settings: settings.clone(),
        tokenizer: tokenizer.clone(),
        inspector: Arc::new(crate::inspect::Inspector::new(settings.clone(), tokenizer)),
        describe_cooldown: checks::Cooldown::new(commands::DESCRIBE_EVERY),
        names_seen: Arc::default(),
    };
    let guilds: Vec<serenity::GuildId> = settings
        .discord
        .guild_ids
        .iter()
        .map(|&id| serenity::GuildId::new(id))
        .collect();
    let options = poise::FrameworkOptions {
        commands: commands::all(),
        on_error: |error| Box::pin(on_error(error)),
        event_handler: |framework, event| Box::pin(on_event(framework, event)),
        ..Default::default()
    };
    let framework = poise::Framework::builder()
        .options(options)
        // Owners come from the application info, which the bot does not need.
        .initialize_owners(false)
        .setup(move |ctx, ready, framework| {
            Box::pin(async move {
                // `setup` must not fail (poise would then wait forever for its data): a failed
                // registration is logged and the bot serves the commands already registered.
                let commands = &framework.options().commands;
                if guilds.is_empty() {
                    if let Err(e) = poise::builtins::register_globally(ctx, commands).await {
                        tracing::error!(error = %e, "cannot register the commands");
                    }
                } else {
                    for guild in &guilds {
                        if let Err(e) =
                            poise::builtins::register_in_guild(ctx, commands, *guild).await
                        {
                            tracing::error!(guild = %guild, error = %e, "cannot register the commands");
                        }
                    }
                }
                tracing::info!(user = %ready.user.name, "connected to Discord");
                // Jobs from before a restart keep their messages updating.
                let interval = progress::edit_interval(&data.settings);
                let handles = progress::Handles::of(ctx.http.clone(), &data);
                match progress::resume_all(&handles, &data.scheduler, interval).await
                {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(jobs = n, "following the messages of earlier jobs again"),
                    Err(e) => tracing::error!(error = %e, "cannot read the jobs of earlier runs"),
                }
                Ok(data)
            })
        })
        .build();
    let mut client = serenity::ClientBuilder::new_with_http(http, intents())
        .framework(framework)
        .await
        .context("Failed to create the Discord client")?;
    let shards = client.shard_manager.clone();
    let _ = gateway.0.set(shards.clone());
    tokio::select! {
        result = client.start() => result.context("the Discord connection failed")?,
        () = shutdown => {
            tracing::info!("disconnecting from Discord");
            shards.shutdown_all().await;
        }
    }
    Ok(())
}
