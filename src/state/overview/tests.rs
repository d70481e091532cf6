use super::*;

fn config(extra: &str) -> Config {
    let text = format!(
        "[[listener]]\naddr = \"127.0.0.1:0\"\n[[site]]\nname = \"shop\"\nhosts = [\"*\"]\nupstream = \"http://127.0.0.1:9\"\njails = [\"wp-login\"]\nchallenge = \"auto\"\n\
         [[jail]]\nname = \"wp-login\"\nmethod = \"POST\"\npath = \"/wp-login.php\"\nstatus = [200]\nhits = 5\nwindow = \"10m\"\nban = \"1h\"\nban_factor = 2.0\nmax_ban = \"7d\"\n{extra}"
    );
    Config::parse(std::path::Path::new("/etc/ipgate/ipgate.toml"), &text).unwrap()
}

#[test]
fn every_figure_follows_the_config_in_both_languages() {
    let c = config("[privacy]\nmax_retention = \"30d\"\ncontact = \"privacy@example.nl\"\n");
    let en = markdown(&c, Lang::En);
    let nl = markdown(&c, Lang::Nl);
    for (text, want) in [
        (&en, "5 failed attempts within 10 minutes lead to a ban of 1 hour; repeat bans grow, up to 7 days"),
        (&nl, "5 mislukte pogingen binnen 10 minuten leiden tot een blokkade van 1 uur; een volgende blokkade duurt langer, tot 7 dagen"),
        (&en, "Nothing is kept longer than 30 days"),
        (&nl, "Niets wordt langer bewaard dan 30 dagen"),
        (&en, "Write to privacy@example.nl"),
        (&nl, "Schrijf naar privacy@example.nl"),
        (&en, "On shop, a browser may be asked"),
        (&en, "50 requests per second, bursts of up to 100"),
        (&en, "logged with a shortened address only"),
    ] {
        assert!(text.contains(want), "{want}\n---\n{text}");
    }
    // Another ban, another retention: other figures; max_ban is capped by the retention.
    let c = config("[privacy]\nmax_retention = \"3d\"\nlog_ip = \"none\"\n");
    let changed = config("").jails[0].ban;
    assert_eq!(changed, Duration::from_secs(3600));
    let en = markdown(&c, Lang::En);
    assert!(en.contains("up to 3 days"), "{en}");
    assert!(en.contains("Nothing is kept longer than 3 days"), "{en}");
    assert!(en.contains("logged without any address"), "{en}");
    assert!(en.contains("Contact the operator of the website"), "{en}");
    let text = config("").jails[0].clone();
    let mut c2 = config("");
    c2.jails[0] = crate::config::Jail {
        ban: Duration::from_secs(7200),
        ..text
    };
    assert!(markdown(&c2, Lang::Nl).contains("een blokkade van 2 uur"));
}

#[test]
fn the_page_is_one_document_with_its_style_allowed_by_hash_and_config_text_escaped() {
    let c = config("[privacy]\noperator = \"Example <b>Hosting</b>\"\n");
    let page = html(&c, Lang::Nl, Some("## Extra\n\nhello\n"));
    assert!(
        page.starts_with("<!DOCTYPE html>\n<html lang=\"nl\">"),
        "{page}"
    );
    assert!(page.contains("<title>Beveiligingsoverzicht"), "{page}");
    assert!(page.contains("<h2>Uw rechten</h2>"), "{page}");
    assert!(
        page.contains("Example &lt;b&gt;Hosting&lt;/b&gt; beveiligt"),
        "{page}"
    );
    assert!(!page.contains("<b>Hosting"));
    assert!(page.contains("<h2>Extra</h2>"));
    assert!(!page.contains("<script"));
    assert!(csp().contains("style-src 'sha256-"));
    assert!(!csp().contains("unsafe-inline"));
}

#[test]
fn durations_are_spoken() {
    assert_eq!(spoken(Duration::from_secs(86_400), Lang::En), "1 day");
    assert_eq!(spoken(Duration::from_secs(7_200), Lang::Nl), "2 uur");
    assert_eq!(spoken(Duration::from_secs(600), Lang::Nl), "10 minuten");
    assert_eq!(spoken(Duration::from_secs(90), Lang::En), "90 seconds");
    assert_eq!(spoken(Duration::from_millis(200), Lang::En), "1 second");
}
