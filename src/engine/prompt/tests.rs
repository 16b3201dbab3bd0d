//! Tests of the prompt language.
use super::*;

fn prompts(input: &str) -> Vec<(String, f64, Option<f64>)> {
    parse(input)
        .unwrap_or_else(|e| panic!("{input:?}: {e}"))
        .prompts
        .into_iter()
        .map(|p| (p.text, p.weight, p.stop))
        .collect()
}

fn p(text: &str, weight: f64, stop: Option<f64>) -> (String, f64, Option<f64>) {
    (text.to_owned(), weight, stop)
}

#[test]
fn a_story_is_scenes_separated_by_carets() {
    let parsed =
        parse("a forest | moss:0.5 ^ a city ^ the sea --no people --change-every 100").unwrap();
    let scenes: Vec<Vec<(String, f64, Option<f64>)>> = parsed
        .story
        .iter()
        .map(|s| {
            s.iter()
                .map(|p| (p.text.clone(), p.weight, p.stop))
                .collect()
        })
        .collect();
    assert_eq!(
        scenes,
        [
            vec![p("a forest", 1.0, None), p("moss", 0.5, None)],
            vec![p("a city", 1.0, None)],
            vec![p("the sea", 1.0, None)],
        ]
    );
    // `--no` guides every scene.
    assert_eq!(prompts_of(&parsed), [p("people", NO_WEIGHT, None)]);
    assert_eq!(parsed.flags.method.change_every, Some(100));
    // No caret, no story.
    assert!(parse("a castle").unwrap().story.is_empty());
    let empty = parse("a forest ^ ^ the sea").unwrap_err();
    assert!(empty.message.contains("scene"), "{empty}");
    let many = parse(&"x ^ ".repeat(MAX_SCENES + 1)).unwrap_err();
    assert!(many.message.contains("scenes"), "{many}");
    let zero = parse("a ^ b --change-every 0").unwrap_err();
    assert!(zero.message.contains("from 1"), "{zero}");
}

#[test]
fn method_flags_are_read_and_checked() {
    let m =
        parse("x --lr 0.05 --optimizer DiffGrad --ema 0.99 --init-noise gradient --init-weight 2")
            .unwrap()
            .flags
            .method;
    assert_eq!(
        m,
        MethodFlags {
            learning_rate: Some(0.05),
            optimizer: Some(Optimizer::DiffGrad),
            ema: Some(0.99),
            init_noise: Some(InitNoise::Gradient),
            init_weight: Some(2.0),
            change_every: None,
            tile: None,
        }
    );
    let tiled = parse("stone wall --tile --steps 9").unwrap().flags;
    assert_eq!((tiled.method.tile, tiled.steps), (Some(true), Some(9)));
    for (input, says) in [
        ("stone --tile wall", "takes no value"),
        ("stone --tile --tile", "given twice"),
    ] {
        let e = parse(input).unwrap_err().to_string();
        assert!(e.contains(says), "{input}: {e}");
    }
    for (input, says) in [
        ("x --optimizer sgd", "adam, adamw, diffgrad"),
        ("x --init-noise perlin", "tokens, pixels, gradient"),
        ("x --lr fast", "--lr takes a number"),
        ("x --lr nan", "--lr takes a number"),
        ("x --ema 0.9 --ema 0.8", "given twice"),
    ] {
        let e = parse(input).unwrap_err().to_string();
        assert!(e.contains(says), "{input}: {e}");
    }
    // Options win over the prompt's flags, flag by flag.
    let options = MethodFlags {
        optimizer: Some(Optimizer::AdamW),
        ..Default::default()
    };
    let merged = options.or(&m);
    assert_eq!(merged.optimizer, Some(Optimizer::AdamW));
    assert_eq!(merged.learning_rate, Some(0.05));
}

fn prompts_of(parsed: &ParsedPrompt) -> Vec<(String, f64, Option<f64>)> {
    parsed
        .prompts
        .iter()
        .map(|p| (p.text.clone(), p.weight, p.stop))
        .collect()
}

#[test]
fn pipes_weights_and_stops() {
    assert_eq!(
        prompts("a castle | fog:0.5 | crowds:-1:0.8"),
        [
            p("a castle", 1.0, None),
            p("fog", 0.5, None),
            p("crowds", -1.0, Some(0.8))
        ]
    );
}

#[test]
fn colons_that_are_not_weights_stay_in_the_text() {
    assert_eq!(
        prompts("sunset at 3:30 pm"),
        [p("sunset at 3:30 pm", 1.0, None)]
    );
    assert_eq!(
        prompts("meeting at 3:30"),
        [p("meeting at 3:30", 1.0, None)]
    );
    assert_eq!(
        prompts(r"C:\pictures\cat"),
        [p(r"C:\pictures\cat", 1.0, None)]
    );
    assert_eq!(
        prompts("ratio 2:1 poster:0.7"),
        [p("ratio 2:1 poster", 0.7, None)]
    );
    assert_eq!(prompts("note: a cat"), [p("note: a cat", 1.0, None)]);
}

#[test]
fn midjourney_double_colons() {
    assert_eq!(
        prompts("a:: b::2 c::-0.5"),
        [p("a", 1.0, None), p("b", 2.0, None), p("c", -0.5, None)]
    );
    assert_eq!(
        prompts("hot dog::1.5 food::-1"),
        [p("hot dog", 1.5, None), p("food", -1.0, None)]
    );
    assert_eq!(prompts("space ship::"), [p("space ship", 1.0, None)]);
    assert_eq!(prompts("at 3:30::0.5"), [p("at 3:30", 0.5, None)]);
}

#[test]
fn flags_are_read_and_no_becomes_a_negative_prompt() {
    let parsed = parse("a lighthouse --ar 16:9 --steps 300 --seed 18446744073709551615 --no boats, people --cutn 16 --model wikiart --clip vit_b32,vit_b16:0.5 --grid 4").unwrap();
    assert_eq!(parsed.prompts.len(), 2);
    assert_eq!(
        parsed.prompts[1],
        WeightedPrompt {
            text: "boats, people".into(),
            weight: NO_WEIGHT,
            stop: None
        }
    );
    assert_eq!(
        parsed.flags,
        PromptFlags {
            seed: Some(u64::MAX),
            steps: Some(300),
            aspect: Some((16, 9)),
            size: None,
            cutn: Some(16),
            model: Some("wikiart".into()),
            clip: Some("vit_b32,vit_b16:0.5".into()),
            grid: Some(4),
            method: MethodFlags::default(),
        }
    );
    let twice = parse("x --grid 4 --grid 1").unwrap_err();
    assert!(twice.message.contains("--grid is given twice"), "{twice}");
    let word = parse("x --grid four").unwrap_err();
    assert!(
        word.message.contains("--grid takes a whole number"),
        "{word}"
    );
    assert_eq!(
        parse("x --size 512x384").unwrap().flags.size,
        Some((512, 384))
    );
    assert_eq!(
        prompts("em--dash and a -- b"),
        [p("em--dash and a -- b", 1.0, None)]
    );
}

#[test]
fn errors_point_at_the_offending_piece() {
    let cases = [
        ("", "empty", ""),
        ("   |  ", "empty", "   |  "),
        (
            "a cat --steps many",
            "--steps takes a whole number",
            "--steps many",
        ),
        ("a cat --ar wide", "--ar takes a ratio", "--ar wide"),
        ("a cat --size 0x5", "--size takes a size", "--size 0x5"),
        ("a cat --seed", "--seed needs a value", "--seed"),
        (
            "a cat --seed 1 --seed 2",
            "--seed is given twice",
            "--seed 2",
        ),
        (
            "a cat --ar 1:1 --size 64x64",
            "either --ar or --size",
            "--size 64x64",
        ),
        ("a cat --style raw", "unknown flag --style", "--style"),
        ("a cat | :0.5", "a weight needs some text", " :0.5"),
    ];
    for (input, message, piece) in cases {
        let e = parse(input).expect_err(input);
        assert!(e.message.contains(message), "{input:?}: {e}");
        assert_eq!(e.piece, piece, "{input:?}");
        assert_eq!(&input[e.span.clone()], piece, "{input:?}");
    }
}

#[test]
fn dashes_from_phones_are_flags_and_other_dashes_stay_text() {
    let parsed = parse("a lighthouse —steps 300 –seed 7 —AR 16:9 —no boats").unwrap();
    assert_eq!(parsed.flags.steps, Some(300));
    assert_eq!(parsed.flags.seed, Some(7));
    assert_eq!(parsed.flags.aspect, Some((16, 9)));
    assert_eq!(parsed.prompts[0].text, "a lighthouse");
    assert_eq!(parsed.prompts[1].text, "boats");
    assert_eq!(
        prompts("a storm —dramatic — and calm–ish"),
        [p("a storm —dramatic — and calm–ish", 1.0, None)]
    );
    let e = parse("a cat —steps many").unwrap_err();
    assert!(e.message.contains("--steps takes"), "{e}");
    assert_eq!(e.piece, "—steps many");
}

#[test]
fn hostile_sizes_and_numbers_are_refused_with_their_limit() {
    // 12,000 pieces: refused by length before any parsing work.
    let e = parse(&"a|".repeat(12_000)).unwrap_err();
    assert!(e.message.contains("the limit is 8192"), "{e}");
    assert!(e.to_string().len() < 200, "{e}");
    let e = parse(&vec!["a"; MAX_PROMPTS + 1].join(" | ")).unwrap_err();
    assert!(
        e.message.contains("65 parts") && e.message.contains("64"),
        "{e}"
    );
    let at_limit = vec!["a"; MAX_PROMPTS - 1].join(" | ") + " --no b";
    assert_eq!(parse(&at_limit).unwrap().prompts.len(), MAX_PROMPTS);
    for (input, message) in [
        ("a cat:1e308", "a weight must be from -100 to 100"),
        ("a cat:-1e308", "a weight must be from -100 to 100"),
        ("a cat::1000", "a weight must be from -100 to 100"),
        ("a cat:1:1e300", "a stop must be from -10 to 10"),
    ] {
        let e = parse(input).expect_err(input);
        assert!(e.message.contains(message), "{input:?}: {e}");
    }
    assert_eq!(prompts("a cat:-100:10"), [p("a cat", -100.0, Some(10.0))]);
}

#[test]
fn prompts_must_show_something() {
    for input in [
        "\u{200B}",
        "\u{3164}\u{3164}",
        "a cat | \u{2800}",
        "\u{FEFF}\u{200D} --steps 5",
        "a cat --no \u{200B}",
        "\u{E0041}::2 b",
    ] {
        let e = parse(input).expect_err(input);
        assert!(e.message.contains("no visible character"), "{input:?}: {e}");
    }
    for input in ["a \u{1b}[2Jcat", "a\rcat", "a \u{202E}tac"] {
        let e = parse(input).expect_err(input);
        assert!(e.message.contains("control character"), "{input:?}: {e}");
    }
    assert_eq!(
        prompts("a\tcat\non two lines"),
        [p("a\tcat\non two lines", 1.0, None)]
    );
    assert!(has_visible_text("猫 \u{200B}"));
    assert!(!has_visible_text(" \t\u{00AD}"));
}

#[test]
fn empty_pieces_between_pipes_are_skipped() {
    assert_eq!(prompts("a || b"), [p("a", 1.0, None), p("b", 1.0, None)]);
}

#[test]
fn a_prompts_words_keep_its_no_flags_and_drop_the_others() {
    assert_eq!(
        words_of("a castle | fog:0.5 --seed 7 --no people --ar 16:9"),
        "a castle | fog:0.5 --no people"
    );
    assert_eq!(words_of("just words"), "just words");
    assert_eq!(words_of("a storm —steps 20 —no rain"), "a storm --no rain");
    assert_eq!(words_of("--seed 3"), "");
}
