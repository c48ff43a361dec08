"""The English text the demo tokenizer is trained on (see `lorasrv.demo`). Data only, no logic."""

from __future__ import annotations

from typing import Final

CORPUS: Final = """\
The quick brown fox jumps over the lazy dog. A small model can still learn the shape of words.
Once upon a time, in a quiet village by the sea, there lived an old fisherman and his daughter.
Every morning they walked down to the harbor before the sun was up, and every evening they came
back with baskets of silver fish. The daughter liked to count the boats; her father liked to
count the stars. "There are more stars than boats," he would say, "but the boats bring us home."

One winter the storms did not stop for three weeks. The waves were taller than the houses, and
nobody could go out to sea. The village ran low on bread, then on oil, then on wood for the fire.
The daughter, whose name was Mira, decided to walk over the mountain to the next town and ask for
help. Her father told her it was too dangerous. She went anyway, with a lantern, a warm coat, and
a letter written by the oldest woman in the village.

The road was long and the snow was deep. At night she slept in a barn with two goats and a cat.
On the fourth day she reached the town, where the people listened to her story and filled a cart
with flour, salt, apples, candles and blankets. They sent three strong horses to pull it. When
Mira came home, the whole village was waiting at the gate, and nobody said a word until she
smiled. Then everybody laughed and cried at the same time.

How to make a simple loaf of bread: mix 500 grams of flour, 10 grams of salt, 7 grams of yeast
and 350 millilitres of warm water. Knead the dough for ten minutes, until it is smooth and
elastic. Cover it and let it rise for about an hour, or until it has doubled in size. Shape the
loaf, place it on a tray, and let it rise again for 30 minutes. Bake at 220 degrees for 25 to 30
minutes. The bread is done when it sounds hollow if you tap the bottom.

The weather today will be cloudy in the morning, with some sunny spells in the afternoon. The
temperature will reach 18 degrees in the north and 24 degrees in the south. Tomorrow there is a
chance of rain, especially near the coast, and the wind will be stronger than usual. On Saturday
and Sunday we expect clear skies and warm weather across the whole country.

A computer program is a list of instructions. The computer reads each instruction and does what
it says, one step at a time. Programs are written in programming languages such as Python, C,
Rust or JavaScript. A good program is easy to read, easy to test and easy to change. When a
program does something wrong, we call it a bug, and finding the bug is called debugging.

def greet(name):
    message = "Hello, " + name + "!"
    print(message)
    return len(message)

for i in range(10):
    if i % 2 == 0:
        print(i, "is even")
    else:
        print(i, "is odd")

A language model reads text as a sequence of tokens. A token may be a whole word, a part of a
word, a single letter, or a piece of punctuation. The model predicts the next token from the
tokens before it. It does this again and again, and each new token is added to the text. The
server sends the new text to the user as soon as it is ready, which is called streaming.

User: What is the capital of France?
Assistant: The capital of France is Paris.
User: And how many people live there?
Assistant: About two million people live in the city of Paris, and more than twelve million
live in the whole metropolitan area.
User: Thank you! Can you tell me a short joke?
Assistant: Why did the scarecrow win an award? Because he was outstanding in his field.
System: You are a helpful assistant. Answer briefly and politely.

Numbers are everywhere: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 100, 256, 1024, 2048, 65536.
The year 2024 had 366 days. A week has 7 days, a day has 24 hours, an hour has 60 minutes, and
a minute has 60 seconds. Pi is about 3.14159, and the square root of two is about 1.41421.
Prices: $5.99, $12.50, 20% off, 3 for 2. Dates: 2025-01-31, 12/25/2024. Times: 09:30, 17:45.

Good morning! How are you today? I am fine, thanks. It is nice to see you again. Would you like
some tea or coffee? Tea, please, with a little milk and no sugar. Here you are. Thank you very
much. You are welcome. Let us sit by the window, where the light is better and we can watch the
people walking by in the street.

The library opens at nine o'clock and closes at six. Books may be borrowed for two weeks, and
they can be renewed twice, online or at the desk. Please be quiet in the reading room, and do not
eat or drink near the computers. Children's books are on the ground floor; science, history and
art are on the first floor; newspapers and magazines are near the entrance.

Mountains rise slowly over millions of years as the plates of the earth push against each other.
Rivers carve deep valleys, glaciers grind the rock, and the wind carries sand across the desert.
Forests grow where there is enough rain, and grasslands cover the plains where it is drier.
Animals and plants adapt to each place: the camel stores fat, the cactus stores water, and the
polar bear has thick fur and a layer of fat to keep warm in the cold.

Music is organized sound. A melody is a sequence of notes, harmony is notes played together, and
rhythm is the pattern of long and short sounds in time. People have made music for as long as
there have been people, with drums, flutes, strings and, above all, their own voices.

It's a beautiful day, isn't it? We'll go to the park, they'd like that, and you're welcome to
come too. I've heard the café near the fountain makes excellent cake. Don't forget your hat!

Learning takes practice. Read a little every day, write down what you learn, and explain it to
someone else. Mistakes are not failures; they show you where to look next. Ask questions, be
patient with yourself, and remember that every expert was once a beginner.

The train leaves from platform four at half past eight. It stops at every station until the
river, then runs fast to the city, where it arrives a few minutes before ten. Tickets can be
bought from the machine, from the office, or on the train itself, but they cost more there.

Doctors say that sleep, food and exercise matter most for good health. Adults need seven to nine
hours of sleep each night. Fresh vegetables, fruit, beans, nuts and whole grains are good for the
heart, and a walk of thirty minutes a day is better than no exercise at all. Drink water, not
sugary drinks, and wash your hands often.

In the beginning the universe was very hot and very dense. As it expanded it cooled, and the
first atoms formed. Gravity pulled gas together into stars and galaxies. Our sun is one star
among hundreds of billions in the Milky Way, and the Milky Way is one galaxy among many billions.
Light from the most distant galaxies has travelled for more than thirteen billion years.

The market on Friday sells fresh bread, cheese, honey, eggs, flowers and vegetables from the
farms around the town. Come early for the best choice, bring your own bag, and say hello to the
old man who sells the sweetest strawberries you have ever tasted.
"""
