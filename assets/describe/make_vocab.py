#!/usr/bin/env python3
"""Builds mediums.txt, movements.txt, artists.txt and flavors.txt from the clip-interrogator
0.6.0 wheel (MIT licence, https://github.com/pharmapsychotic/clip-interrogator).

    pip download clip-interrogator==0.6.0 --no-deps
    apt-get download wamerican && dpkg -x wamerican_*.deb dict
    python3 make_vocab.py clip_interrogator-0.6.0-py3-none-any.whl dict/usr/share/dict/american-english

- mediums.txt, movements.txt: the wheel's lists as they are.
- artists.txt: the artists below, chosen by hand from the wheel's artists.txt (5,265 names):
  well-known artists who are no longer living, so that no suggestion names a working artist.
- flavors.txt: the first 1,500 of the wheel's flavors.txt (100,970 phrases, most used first)
  that pass the filters below: no digits or punctuation (camera settings and typos such as
  "8 k"), every word an English dictionary word in lower case or one of the art terms below
  (which drops people's names), nothing sexual, gory, drug-related or about bodies, and no
  phrase already in another list or equal to an earlier one but for spaces and hyphens.

subjects.txt, lighting.txt and colours.txt are written by hand for vqclip.
"""
import re
import sys
import unicodedata
import zipfile

ARTISTS = """
Albrecht Dürer|Alphonse Mucha|Amedeo Modigliani|Andrea Mantegna|Andrei Rublev|Arkhip Kuindzhi
Arnold Böcklin|Aubrey Beardsley|Arthur Rackham|Berthe Morisot|Caravaggio|Camille Pissarro
Canaletto|Caspar David Friedrich|Claude Lorrain|Claude Monet|Edgar Degas|Édouard Manet
Edvard Munch|Egon Schiele|El Greco|Eugène Delacroix|Francisco Goya|Franz Marc
Frederic Edwin Church|Frederic Leighton|Georges Seurat|Gustave Doré|Gustav Klimt
Gustave Courbet|Gustave Moreau|Hans Holbein the Younger|Hieronymus Bosch|Henri Matisse
Henri Rousseau|Henri de Toulouse-Lautrec|Ivan Aivazovsky|Ivan Shishkin|Ivan Bilibin
J. M. W. Turner|Jacques-Louis David|Jan van Eyck|Johannes Vermeer|John Constable
John Singer Sargent|John William Waterhouse|Kazimir Malevich|Katsushika Hokusai
Kitagawa Utamaro|Leonardo da Vinci|Mary Cassatt|Maxfield Parrish|Michelangelo|Odilon Redon
Paul Cézanne|Paul Gauguin|Paul Klee|Peter Paul Rubens|Pierre-Auguste Renoir|Piet Mondrian
Pieter Bruegel the Elder|Raphael|Rembrandt|Sandro Botticelli|Thomas Cole|Titian
Vincent van Gogh|Wassily Kandinsky|William Blake|William Morris|William-Adolphe Bouguereau
Winslow Homer|Zdzisław Beksiński|Albert Bierstadt|Alfred Sisley|Edward Hopper|Frida Kahlo
Georgia O'Keeffe|Grant Wood|Hilma af Klint|Ilya Repin|Joaquín Sorolla|John Atkinson Grimshaw
Kay Nielsen|Edmund Dulac|Harry Clarke|Howard Pyle|N. C. Wyeth|J. C. Leyendecker
Norman Rockwell|Ivan Albright|René Magritte|Salvador Dali|Giorgio de Chirico|Max Ernst
Yves Tanguy|Joan Miro|Pablo Picasso|Georges Braque|Juan Gris|Fernand Léger|Marc Chagall
Umberto Boccioni|Giacomo Balla|Franz Kline|Jackson Pollock|Mark Rothko|Willem de Kooning
Helen Frankenthaler|Roy Lichtenstein|Andy Warhol|Keith Haring|Jean-Michel Basquiat
M. C. Escher|Utagawa Kuniyoshi|Tsukioka Yoshitoshi|Kawase Hasui|Hiroshi Yoshida|Ohara Koson
Itō Jakuchū|Sesshū Tōyō|Qi Baishi|Xu Beihong|Nicholas Roerich|Viktor Vasnetsov|Mikhail Vrubel
Konstantin Korovin|Isaac Levitan|Jean Delville|Carlos Schwabe|Lawrence Alma-Tadema
Dante Gabriel Rossetti|John Everett Millais|Edward Burne-Jones|Evelyn De Morgan
Ford Madox Brown|Walter Crane|Beatrix Potter|Winsor McCay|Louis Wain|Gustave Caillebotte
Édouard Vuillard|Pierre Bonnard|Maurice Denis|Paul Signac|Henri-Edmond Cross|André Derain
Maurice de Vlaminck|Raoul Dufy|Kees van Dongen|Georges Rouault|Chaim Soutine|Oskar Kokoschka
Ernst Ludwig Kirchner|Emil Nolde|August Macke|Lyonel Feininger|Otto Dix|George Grosz
Käthe Kollwitz|Tamara de Lempicka|Diego Rivera|José Clemente Orozco|Remedios Varo
Leonora Carrington|Dorothea Tanning|Edward Gorey|Rockwell Kent|Ansel Adams|Dorothea Lange
Henri Cartier-Bresson|Edward Weston|Man Ray|Carl Larsson|John Bauer|Akseli Gallen-Kallela
Hugo Simberg|Anders Zorn|Peder Severin Krøyer|Bruno Liljefors|Hubert Robert
Giovanni Battista Piranesi|Jean-Honoré Fragonard|François Boucher|Thomas Gainsborough
Joshua Reynolds|George Stubbs|Joseph Wright of Derby|Francisco de Zurbarán|Diego Velázquez
Bartolomé Esteban Murillo|Artemisia Gentileschi|Giotto|Fra Angelico|Piero della Francesca
Giovanni Bellini|Giorgione|Tintoretto|Paolo Veronese|Correggio|Parmigianino
Jan Brueghel the Elder|Frans Hals|Jan Steen|Pieter de Hooch|Jacob van Ruisdael
Meindert Hobbema|Aelbert Cuyp|Anthony van Dyck|Rachel Ruysch|Maria Sibylla Merian
John James Audubon|Ernst Haeckel|Gustave Baumann|Arthur Dove|Charles Demuth|Thomas Moran
George Inness|Frederic Remington|Childe Hassam|William Merritt Chase
James Abbott McNeill Whistler|Thomas Eakins|Andrew Wyeth|Edward Robert Hughes
Henry Ossawa Tanner|Jacob Lawrence|Aaron Douglas
"""

ART_TERMS = set("""
artstation octane unreal cyberpunk steampunk dieselpunk solarpunk biopunk synthwave vaporwave
retrowave outrun bokeh hdr cgi vfx zbrush blender scifi sci fi photorealistic hyperrealistic
hyperdetailed photoreal photorealism hyperrealism ultrarealistic ultra hyper cel shaded render
rendered renderer raytracing raytraced unreal lowpoly poly isometric maximalist maximalism
minimalistic minimalist cinematic chiaroscuro sfumato impasto gouache ukiyo anime manga chibi
kawaii lovecraftian eldritch bioluminescence bioluminescent iridescent holographic fractal
fractals filmic lomography polaroid kodachrome ektachrome cinestill dslr photoshoot closeup
fullbody headshot wallpaper concept fantasy mecha cyborg biomechanical liminal dreamlike
surrealism surrealist surrealistic expressionism expressionist impressionist impressionism
pointillism cubism cubist baroque rococo renaissance gothic neo art nouveau deco
""".split())

BLOCKED = set("""
sexy sensual seductive seductively nude naked nsfw bikini lingerie bra breasts breast boobs
cleavage busty erotic erotica porn pornographic thicc curvy hourglass underwear panties butt
ass alluring hot fetish bdsm latex topless lewd gore gory blood bloody death dead corpse
corpses suicide kill killing killer murder murdered gun guns drug drugs lsd dmt cocaine weed
sweaty giantess yandere furry waifu loli hentai ecchi pinup playboy feet legs thighs skin
body bodies belly navel lips tongue kiss kissing intimate lust lustful provocative revealing
slim skinny fat obese muscular naughty stripper seduction tight wet nazi swastika war weapon
weapons violent violence torture tortured horror horrific grotesque disturbing creepy
terrifying scary decay rotting flesh bones skeleton skull veins wound wounds injured
""".split())


def words(phrase):
    return [w for w in re.split(r"[ \-']+", phrase) if w]


def main(wheel, dictionary):
    with zipfile.ZipFile(wheel) as z:
        read = lambda name: z.read(f"clip_interrogator/data/{name}").decode("utf-8").splitlines()
        mediums = [l.strip() for l in read("mediums.txt") if l.strip()]
        movements = [l.strip() for l in read("movements.txt") if l.strip()]
        artists = {l.strip() for l in read("artists.txt") if l.strip()}
        flavors = [l.strip() for l in read("flavors.txt") if l.strip()]
    fold = lambda s: unicodedata.normalize("NFC", s)
    # The wheel's own spelling and capitals.
    artists = {fold(a).lower(): fold(a) for a in artists}
    picked = [fold(a.strip()) for a in ARTISTS.replace("\n", "|").split("|") if a.strip()]
    missing = [a for a in picked if a.lower() not in artists]
    if missing:
        sys.exit(f"not in the wheel's artists.txt: {missing}")
    picked = [artists[a.lower()] for a in picked]
    english = {w.strip() for w in open(dictionary, encoding="utf-8") if w.strip().islower()}
    key = lambda s: re.sub(r"[ \-]", "", s.lower())
    seen = {key(p) for p in mediums + movements}
    for own in ("subjects.txt", "lighting.txt", "colours.txt"):
        seen |= {key(l) for l in open(own, encoding="utf-8") if l.strip()}
    kept = []
    for phrase in flavors:
        p = phrase.lower()
        if not re.fullmatch(r"[a-z][a-z '\-]*[a-z]", p):
            continue
        ws = words(p)
        if any(w in BLOCKED for w in ws):
            continue
        if not all(w in english or w in ART_TERMS for w in ws):
            continue
        if key(p) in seen:
            continue
        seen.add(key(p))
        kept.append(p)
        if len(kept) == 1500:
            break
    for name, lines in (("mediums.txt", mediums), ("movements.txt", movements),
                        ("artists.txt", picked), ("flavors.txt", kept)):
        with open(name, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        print(f"{name}: {len(lines)}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
